"""The distributed cache backend: aiocache's ``RedisCache`` (redis-py), through its public API.

Imported only when a policy puts the cache on Redis (``plugins.cache.backend.open_backend``):
importing aiocache loads redis-py, 7 MB of resident memory a memory-only gateway does not need.

``redis://[user:password@]host[:port][/db][?timeout=seconds]`` (``rediss://`` for TLS). Entries
are opaque bytes (``NullSerializer(encoding=None)``, so nothing is decoded as UTF-8) under the
namespace + key, with the TTL enforced by the server. Each operation is bounded by redis-py's
socket timeout (``?timeout=``, default 0.5 s) instead of aiocache's per-call
``asyncio.wait_for`` (``timeout=None``), which would schedule a Task per call: a slow or dead
Redis still costs a counted miss, not a stuck request.

Beside the entries: ``{namespace}owner:{tenant}``, a set of the tenant's entry keys living as
long as its longest entry (``forget_owner``), and ``{namespace}flight:{key}``, the flight lock.
Claiming it is one script that first looks for the entry: a request whose lookup missed just
before the leader stored the answer and released the lock finds the answer there instead of
taking a fresh lock and calling the provider a second time. Releasing deletes the lock only
while this instance still holds it (a leader that outlived the lock's TTL must not drop the
next leader's).
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from aiocache.backends.redis import RedisCache
from aiocache.serializers import NullSerializer

DEFAULT_REDIS_TIMEOUT = 0.5

# KEYS: entry, lock; ARGV: holder, ttl in ms. {1, entry} | {2, holder of the lock} | {0}: taken
_CLAIM = """
local entry = redis.call('GET', KEYS[1])
if entry then return {1, entry} end
local held = redis.call('SET', KEYS[2], ARGV[1], 'NX', 'GET', 'PX', ARGV[2])
if held then return {2, held} end
return {0}
"""

# KEYS: lock; ARGV: holder
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _join_key(key: str, namespace: str | None = None) -> str:
    """namespace + key (aiocache's default key builder would insert a ':')."""
    return f"{namespace or ''}{key}"


class RedisBackend:
    """``CacheBackend`` on Redis, shared by every instance of the gateway."""

    kind = "redis"
    distributed = True

    def __init__(self, url: str, namespace: str) -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        timeout = float(query.get("timeout", [DEFAULT_REDIS_TIMEOUT])[0])
        pool_kwargs: dict[str, Any] = {"socket_timeout": timeout}
        if parts.username:
            pool_kwargs["username"] = unquote(parts.username)
        self.kind = parts.scheme
        self.namespace = namespace
        self.cache = RedisCache(
            serializer=NullSerializer(encoding=None),
            namespace=namespace,
            key_builder=_join_key,
            timeout=None,
            endpoint=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=int(parts.path.strip("/") or "0"),
            password=unquote(parts.password) if parts.password else None,
            create_connection_timeout=timeout,
            ssl=parts.scheme == "rediss",
            connection_pool_kwargs=pool_kwargs,
        )
        self.client: Any = self.cache.client  # redis-py: pipelines, and tests reading raw keys
        self._claim = self.client.register_script(_CLAIM)
        self._release = self.client.register_script(_RELEASE)

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self.cache.get(key)
        return value

    async def set(
        self, key: str, value: bytes, ttl: float | None = None, owner: str | None = None
    ) -> bool:
        # psetex needs >= 1 ms; a float ttl makes aiocache's backend use ms precision
        stored = bool(
            await self.cache.set(key, value, ttl=None if ttl is None else max(float(ttl), 0.001))
        )
        if owner is not None:  # a set per owner, living as long as its longest entry
            index = f"{self.namespace}owner:{owner}"
            seconds = max(1, math.ceil(ttl)) if ttl else None
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.sadd(index, self.namespace + key)
                if seconds is None:
                    pipe.persist(index)
                else:
                    pipe.expire(index, seconds, gt=True)  # longer than the set's TTL, or
                    pipe.expire(index, seconds, nx=True)  # the set had none: one round trip
                await pipe.execute()
        return stored

    async def delete(self, key: str) -> int:
        return int(await self.cache.delete(key))

    async def forget_owner(self, owner: str) -> int:
        index = f"{self.namespace}owner:{owner}"
        keys = await self.cache.raw("smembers", index)
        deleted = int(await self.cache.raw("delete", *keys)) if keys else 0
        await self.cache.raw("delete", index)
        return deleted

    async def claim(self, key: str, holder: bytes, ttl: float) -> tuple[bytes | None, bytes | None]:
        keys = [self.namespace + key, f"{self.namespace}flight:{key}"]
        reply = await self._claim(keys=keys, args=[holder, max(1, int(ttl * 1000))])
        if reply[0] == 1:
            return reply[1], None
        return None, reply[1] if reply[0] == 2 else None

    async def release(self, key: str, holder: bytes) -> None:
        await self._release(keys=[f"{self.namespace}flight:{key}"], args=[holder])

    async def in_flight(self, key: str) -> bool:
        return bool(await self.cache.raw("exists", f"{self.namespace}flight:{key}"))

    def footprint(self) -> tuple[int, int, int]:
        return 0, 0, 0  # the server owns size and eviction

    async def close(self) -> None:
        # redis-py's own close (aiocache's close() calls the deprecated client.close())
        await self.client.aclose()
