"""Where stored responses live: process memory (bounded, LRU) or Redis (shared by instances).

A backend keeps opaque bytes (sealed records, ``plugins.responses.store``) under a key with a
TTL, and knows which tenant wrote each one, so a user's records can be listed and deleted
(``DELETE /admin/users/{user}/data``). ``open_backend`` picks the implementation from the URL
once, when the store is built.

In memory it is the core's ``OwnedStore`` (``proxy.ownedstore``, the cache's in-process
backend too). Why not the cache's Redis backend: a plugin never imports another plugin, and
this one needs less (no flight lock) and one more thing: ``put`` never replaces a live record
(``SET NX``), so an id already stored can never be handed to another tenant.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit

from proxy.ownedstore import OwnedStore

DEFAULT_REDIS_TIMEOUT = 0.5

# KEYS: value, owner index; ARGV: value, ttl in ms, index ttl in s. 1: stored, 0: one was there.
# One script: the key joins the owner's index only when it is the owner's (a failed SET NX
# must not let this owner's erasure delete another tenant's record).
_PUT = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('SADD', KEYS[2], KEYS[1])
if redis.call('TTL', KEYS[2]) < tonumber(ARGV[3]) then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
return 1
"""


class ResponsesBackend(Protocol):
    """Opaque bytes under string keys (the backend adds its namespace), each with a TTL."""

    kind: str
    """The URL scheme, for log lines."""

    async def get(self, key: str) -> bytes | None:
        """The live value, or None. Errors are raised (the store decides what they mean)."""
        ...

    async def put(self, key: str, value: bytes, ttl: float, owner: str) -> bool:
        """Store ``value`` for ``ttl`` seconds unless a live value is already there; False
        when it was not stored (there was one, or it can never fit)."""
        ...

    async def delete(self, key: str, owner: str) -> int:
        """Delete a value; how many there were (0 or 1)."""
        ...

    async def owned(self, owner: str) -> list[str]:
        """The keys (without namespace) ``owner`` may still have values under."""
        ...

    async def forget_owner(self, owner: str) -> int:
        """Delete every live value put for ``owner``; how many there were."""
        ...

    def footprint(self) -> tuple[int, int, int]:
        """(values, bytes, evictions) where this process bounds the store; zeros on Redis."""
        ...

    async def close(self) -> None:
        """Drop the values (memory) or the connections (Redis)."""
        ...


class MemoryBackend(OwnedStore):
    """In process (``proxy.ownedstore``), bounded by ``max_bytes`` (key + value lengths),
    least recently used out; ``put`` keeps a live value rather than replacing it."""

    async def put(self, key: str, value: bytes, ttl: float, owner: str) -> bool:
        return await self.set(key, value, ttl, owner, replace=False)


class RedisBackend:
    """On Redis (redis-py's asyncio client), shared by every instance of the gateway.

    Beside the values, ``{namespace}owner:{tenant}`` is the set of the tenant's keys, living as
    long as its longest value. Each call is bounded by the socket timeout (``?timeout=``
    seconds in the URL, default 0.5), so a dead Redis costs an error, not a stuck request.
    """

    def __init__(self, url: str, namespace: str) -> None:
        import redis.asyncio as aioredis  # only a Redis deployment loads redis-py

        parts = urlsplit(url)
        query = parse_qsl(parts.query)
        timeout = float(dict(query).get("timeout", DEFAULT_REDIS_TIMEOUT))
        rest = urlencode([(k, v) for k, v in query if k != "timeout"])
        self.kind = parts.scheme
        self.namespace = namespace
        self.client: Any = aioredis.from_url(
            parts._replace(query=rest).geturl(),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        self._put = self.client.register_script(_PUT)

    def _index(self, owner: str) -> str:
        return f"{self.namespace}owner:{owner}"

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self.client.get(self.namespace + key)
        return value

    async def put(self, key: str, value: bytes, ttl: float, owner: str) -> bool:
        keys = [self.namespace + key, self._index(owner)]
        args: list[bytes | int] = [value, max(1, int(ttl * 1000)), max(1, math.ceil(ttl))]
        return bool(await self._put(keys=keys, args=args))

    async def delete(self, key: str, owner: str) -> int:
        skey = self.namespace + key
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(skey)
            pipe.srem(self._index(owner), skey)
            deleted, _ = await pipe.execute()
        return int(deleted)

    async def owned(self, owner: str) -> list[str]:
        cut = len(self.namespace)
        members = await self.client.smembers(self._index(owner))
        return [m.decode()[cut:] for m in members]

    async def forget_owner(self, owner: str) -> int:
        index = self._index(owner)
        keys = await self.client.smembers(index)
        deleted = int(await self.client.delete(*keys)) if keys else 0
        await self.client.delete(index)
        return deleted

    def footprint(self) -> tuple[int, int, int]:
        return 0, 0, 0  # the server owns size and eviction

    async def close(self) -> None:
        await self.client.aclose()


def open_backend(
    url: str, namespace: str, max_bytes: int, clock: Callable[[], float] = time.monotonic
) -> ResponsesBackend:
    """The backend for ``url``: ``memory://`` or ``redis[s]://host:port/db``."""
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return MemoryBackend(max_bytes, namespace, clock)
    if scheme in ("redis", "rediss"):
        return RedisBackend(url, namespace)
    raise ValueError(f"unsupported state url scheme {scheme!r} (memory:// or redis://)")
