"""aiocache's base classes, imported without the Redis client aiocache loads eagerly.

Importing the ``aiocache`` package imports redis-py whenever it is installed, to register its
Redis backend: 7 MB of resident memory (measured), which a gateway on ``state.url: memory://``
never uses. ``redis`` is masked while aiocache initialises, so aiocache skips that registration;
``plugins.cache.store`` imports the Redis backend, and redis-py with it, from
``aiocache.backends.redis`` when a policy asks for Redis. If something imported redis or
aiocache first, nothing is masked.
"""

from __future__ import annotations

import sys

if "aiocache" not in sys.modules and "redis" not in sys.modules:
    sys.modules["redis"] = None  # type: ignore[assignment]  # "import redis" -> ImportError
    try:
        import aiocache  # noqa: F401
    finally:
        del sys.modules["redis"]

from aiocache.base import BaseCache
from aiocache.serializers import NullSerializer

__all__ = ["BaseCache", "NullSerializer"]
