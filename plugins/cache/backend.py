"""Where the cache's entries live: one small interface, an in-process and a Redis implementation.

``CacheStore`` (``plugins.cache.store``) encrypts, counts and fails open; a ``CacheBackend``
only keeps opaque bytes under a key, with a TTL, and knows which tenant wrote an entry (so a
user's entries can be forgotten). ``open_backend`` picks the implementation from the URL once,
when the store is built:

* ``memory://``: ``MemoryBackend`` (``plugins.cache.memory``), bounded by total bytes, LRU.
* ``redis://`` / ``rediss://``: ``RedisBackend`` (``plugins.cache.redis_backend``), aiocache's
  ``RedisCache``; importing it loads aiocache and redis-py, so a gateway that never builds one
  does not carry them.

Why the in-process store does not go through aiocache's API, although aiocache is the cache
library: its public calls run a stack of decorators (an ``os.getenv`` per call, the plugin hook
loop, a nested coroutine per layer) that cost several µs a call, more than the rest of a cache
hit (numbers in ``docs/architecture.md``, "Cache storage"). A hit is the path whose latency the
cache exists for, and a network round trip to Redis dwarfs those µs, so Redis uses aiocache and
memory does not: one interface, two implementations, neither bypassing the other's API.
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import urlsplit

from plugins.cache.memory import MemoryBackend


class CacheBackend(Protocol):
    """Opaque bytes under string keys (the backend adds its namespace), each with a TTL."""

    kind: str
    """The URL scheme, for log lines."""

    distributed: bool
    """Whether other instances see the entries: only then does a flight lock mean something."""

    async def get(self, key: str) -> bytes | None:
        """The live value, or None. Errors are raised (the store counts them as misses)."""
        ...

    async def set(
        self, key: str, value: bytes, ttl: float | None = None, owner: str | None = None
    ) -> bool:
        """Store ``value`` for ``ttl`` seconds (None: until evicted); False when it can never
        fit (the old value is gone either way). ``owner`` (a tenant) lets ``forget_owner``
        find the entry again."""
        ...

    async def delete(self, key: str) -> int:
        """Delete an entry; how many there were (0 or 1)."""
        ...

    async def forget_owner(self, owner: str) -> int:
        """Delete every live entry set for ``owner``; how many there were."""
        ...

    async def claim(self, key: str, holder: bytes, ttl: float) -> tuple[bytes | None, bytes | None]:
        """In one atomic step: ``(entry, None)`` when ``key`` has an entry (nothing is
        claimed); else take the flight lock of ``key`` for ``holder`` and ``ttl`` seconds if
        nobody holds it, ``(None, None)``, or leave it: ``(None, who holds it)``."""
        ...

    async def release(self, key: str, holder: bytes) -> None:
        """Drop the flight lock of ``key`` if ``holder`` still holds it."""
        ...

    async def in_flight(self, key: str) -> bool:
        """Whether someone holds the flight lock of ``key``."""
        ...

    def footprint(self) -> tuple[int, int, int]:
        """(entries, bytes, evictions) of a store this process bounds; zeros where the server
        owns that state (Redis)."""
        ...

    async def close(self) -> None:
        """Drop the entries (memory) or the connections (Redis)."""
        ...


def open_backend(url: str, namespace: str, max_bytes: int) -> CacheBackend:
    """The backend for ``url``, chosen once (``memory://`` or ``redis[s]://host:port/db``)."""
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return MemoryBackend(max_bytes, namespace)
    if scheme in ("redis", "rediss"):
        from plugins.cache.redis_backend import RedisBackend  # loads aiocache and redis-py

        return RedisBackend(url, namespace)
    raise ValueError(f"unsupported cache url scheme {scheme!r} (memory:// or redis://)")
