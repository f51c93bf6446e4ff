"""The distributed cache backend: the calls a request waits on over the gateway's pipelined
connection (``proxy.resp``), the rest through aiocache's ``RedisCache`` (redis-py).

A lookup, a store, the flight lock's claim and release run on every cacheable request: through
aiocache's public API (its decorator stack over redis-py's pooled client) one ``get`` cost the
gateway ~50 µs of CPU with 32 requests in flight and ~110 µs alone, against ~2-7 µs for the
same ``GET`` on ``proxy.resp.RespLink`` (``docs/architecture.md``, "Cache storage"), and a
round trip's own CPU is that small. So those go over the link (a store and its owner index in one
write); deleting entries and forgetting a tenant, which no request waits on, keep aiocache.

Imported only when a policy puts the cache on Redis (``plugins.cache.backend.open_backend``):
importing aiocache loads redis-py, 7 MB of resident memory a memory-only gateway does not need.

``redis://[user:password@]host[:port][/db][?timeout=seconds]`` (``rediss://`` for TLS). Entries
are opaque bytes (``NullSerializer(encoding=None)``, so nothing is decoded as UTF-8) under the
namespace + key, with the TTL enforced by the server. Each operation is bounded by the URL's
timeout (``?timeout=``, default 0.5 s: the link's reply timeout, redis-py's socket timeout)
instead of aiocache's per-call ``asyncio.wait_for`` (``timeout=None``), which would schedule a
Task per call: a slow or dead Redis still costs a counted miss, not a stuck request.

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

from proxy.resp import RespLink, Script, bulk, pack

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
        self.client: Any = self.cache.client  # redis-py: tests reading raw keys
        self.link = RespLink(url, timeout=timeout)
        self._claim = Script(_CLAIM)
        self._release = Script(_RELEASE)

    def _key(self, key: str) -> bytes:
        return (self.namespace + key).encode()

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self.link.call(pack(b"GET", self._key(key)))
        return value

    async def set(
        self, key: str, value: bytes, ttl: float | None = None, owner: str | None = None
    ) -> bool:
        full = self._key(key)
        # PX needs >= 1 ms
        store: list[bytes | int] = [b"SET", full, value]
        if ttl is not None:
            store += [b"PX", max(1, int(ttl * 1000))]
        commands = [pack(*store)]
        if owner is not None:  # a set per owner, living as long as its longest entry
            index = f"{self.namespace}owner:{owner}".encode()
            commands.append(pack(b"SADD", index, full))
            if not ttl:
                commands.append(pack(b"PERSIST", index))
            else:
                seconds = max(1, math.ceil(ttl))
                commands.append(pack(b"EXPIRE", index, seconds, b"GT"))  # longer than its TTL,
                commands.append(pack(b"EXPIRE", index, seconds, b"NX"))  # or it had none
        await self.link.pipeline(*commands)  # one write, one round trip
        return True

    async def delete(self, key: str) -> int:
        return int(await self.cache.delete(key))

    async def forget_owner(self, owner: str) -> int:
        index = f"{self.namespace}owner:{owner}"
        keys = await self.cache.raw("smembers", index)
        deleted = int(await self.cache.raw("delete", *keys)) if keys else 0
        await self.cache.raw("delete", index)
        return deleted

    def _flight(self, key: str) -> bytes:
        return f"{self.namespace}flight:{key}".encode()

    async def claim(self, key: str, holder: bytes, ttl: float) -> tuple[bytes | None, bytes | None]:
        packed = b"".join(
            map(bulk, (self._key(key), self._flight(key), holder, b"%d" % max(1, int(ttl * 1000))))
        )
        reply = await self.link.evalsha(self._claim, self._claim.command(2, 2, packed))
        if reply[0] == 1:
            return reply[1], None
        return None, reply[1] if reply[0] == 2 else None

    async def release(self, key: str, holder: bytes) -> None:
        packed = bulk(self._flight(key)) + bulk(holder)
        await self.link.evalsha(self._release, self._release.command(1, 1, packed))

    async def in_flight(self, key: str) -> bool:
        return bool(await self.link.call(pack(b"EXISTS", self._flight(key))))

    def footprint(self) -> tuple[int, int, int]:
        return 0, 0, 0  # the server owns size and eviction

    async def close(self) -> None:
        await self.link.close()
        # redis-py's own close (aiocache's close() calls the deprecated client.close())
        await self.client.aclose()
