"""Encrypted, byte-bounded storage layer for the response cache, built on aiocache.

Why this exists: cached responses are user data (prompts, completions), so they are encrypted
at rest with AES-256-GCM, and the in-process cache must not grow without bound, which
aiocache's ``SimpleMemoryCache`` does. ``CacheStore`` therefore wraps an aiocache backend:

* ``memory://`` (default): :class:`BoundedMemoryCache`, an aiocache backend over an
  ``OrderedDict`` with per-entry expiry, total-bytes accounting and LRU eviction.
* ``redis://[:password@]host[:port][/db][?timeout=seconds]`` (``rediss://`` for TLS):
  aiocache's ``RedisCache`` (redis-py), TTL enforced by the server.

Entry format (all backends store opaque bytes; ``NullSerializer(encoding=None)`` so redis
returns bytes instead of decoding them as UTF-8)::

    version (1 byte = 0x01) | len(key_id) (1 byte) | key_id | nonce (12 bytes) | ciphertext+tag

The associated data is the header plus the full storage key (namespace + cache key), so an
entry copied under another key, a tampered entry, or one written with a key id we no longer
hold all fail authentication and read as a miss (``stats.decrypt_failures``). The first key
of the key ring encrypts; all keys decrypt, so rotation is "prepend the new key, drop the old
one after the longest TTL".

Hot path: aiocache wraps every public call in four decorators (an ``AIOCACHE_DISABLE``
``os.getenv``, ``asyncio.wait_for`` when a timeout is set, a plugin loop, debug logging).
Measured with a micro-benchmark on the dev box (2 shared vCPUs, Python 3.11, aiocache
0.12.3; 200-byte value, 64-char key, warm key, best of 15 x 20k awaited calls; µs per call)::

                                                   get     set
    SimpleMemoryCache(), defaults (timeout=5)      29.3    34.4
    SimpleMemoryCache(timeout=None)                 4.5     8.9   (set: a TimerHandle per ttl)
    BoundedMemoryCache, timeout=5                  30.8    32.0
    BoundedMemoryCache, timeout=None                5.0     6.1
      + HitMissRatioPlugin + TimingPlugin          13.6    14.9
      + PickleSerializer instead of Null            5.6     7.0
    BoundedMemoryCache read/write (no API wrapper)  0.6     1.0   <- used
    AES-256-GCM open / seal (incl. urandom nonce)   2.1     2.1
    CacheStore.get / .set end to end, API           8.2    10.1
    (re-measured on a quieter box: 3.8 / 4.6 through aiocache's API, 1.5 / 2.0 with read/write)

``timeout=None`` is the big win (~6x): ``asyncio.wait_for`` schedules a Task per call, and the
memory backend never awaits, so that timeout could never fire anyway. No plugins and the null
serializer shave the rest. What remains is the wrapper stack itself (nested coroutines plus the
env lookup). The in-process backend is this module's own class, so ``CacheStore`` skips that
stack and calls its synchronous ``read``/``write`` (the same code its aiocache ``_get``/``_set``
run): a cache hit is the path whose latency the cache exists for. Redis goes through aiocache's
API: its private ``_get``/``_set`` signatures change between releases, and a network round trip
dwarfs the wrappers. Its per-operation bound comes from redis-py's socket timeout (default
0.5 s, ``?timeout=`` in the URL) instead of ``asyncio.wait_for``, so a slow or dead redis still
degrades to a counted miss without the per-call Task.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from plugins.cache.aiocache_base import BaseCache, NullSerializer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
NONCE_LEN = 12
TAG_LEN = 16
KEY_LEN = 32
DEFAULT_REDIS_TIMEOUT = 0.5
ERROR_LOG_EVERY = 10.0
"""Seconds between two log lines about backend failures (the rest are counted)."""


@dataclass
class CacheStats:
    """Counters for the cache plugin and the admin API.

    ``entries``/``bytes``/``evictions`` come from the memory backend (0 for redis, where the
    server owns that state). ``bytes`` counts key length + encrypted value length per entry.
    """

    hits: int = 0
    misses: int = 0
    sets: int = 0
    entries: int = 0
    bytes: int = 0
    evictions: int = 0
    decrypt_failures: int = 0
    errors: int = 0
    oversize: int = 0
    coalesced: int = 0  # answers taken from another instance's request in flight


def parse_key(secret: str) -> bytes:
    """Decode a 32-byte AES key given as 64 hex characters or base64 (standard or URL-safe).

    The error message never echoes the secret, only its length, since it ends up in logs.
    """
    if not isinstance(secret, str):
        raise ValueError("cache encryption key must be a string (64 hex chars or base64)")
    text = secret.strip()
    if len(text) == 2 * KEY_LEN:
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise ValueError(
                "cache encryption key has 64 characters but is not valid hex"
            ) from None
    b64 = text.replace("-", "+").replace("_", "/")
    b64 += "=" * (-len(b64) % 4)
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_LEN:
        raise ValueError(
            "cache encryption key must be 32 bytes, given as 64 hex characters or base64 "
            f"(e.g. `openssl rand -base64 32`); got {len(text)} characters that are neither"
        )
    return raw


def _join_key(key: str, namespace: str | None = None) -> str:
    """Key builder shared by both backends (RedisCache would otherwise insert a ':')."""
    return f"{namespace or ''}{key}"


class BoundedMemoryCache(BaseCache):  # type: ignore[misc]
    """aiocache backend: in-process bytes cache bounded by total size, evicting LRU entries.

    Expiry is lazy (checked on access and when an entry reaches the LRU end) instead of one
    timer per entry like ``SimpleMemoryCache``: no timer handles to leak or cancel, and
    expired entries are the first to go once they stop being used. Everything is synchronous
    inside the coroutines, so each operation is atomic on the event loop.
    """

    NAME = "tollway-bounded-memory"

    def __init__(self, max_bytes: int, **kwargs: Any) -> None:
        kwargs.setdefault("serializer", NullSerializer(encoding=None))
        super().__init__(**kwargs)
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self._store: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self.nbytes = 0
        self.evictions = 0
        # which tenant an entry belongs to, kept exactly as long as the entry (forget_owner)
        self._owner_of: dict[str, str] = {}
        self._owned: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._store)

    def _live(self, key: str) -> bytes | None:
        item = self._store.get(key)
        if item is None:
            return None
        if item[1] <= time.monotonic():
            self._drop(key)
            return None
        return item[0]

    def _drop(self, key: str) -> int:
        item = self._store.pop(key, None)
        if item is None:
            return 0
        self.nbytes -= len(key) + len(item[0])
        self._disown(key)
        return 1

    def _disown(self, key: str) -> None:
        owner = self._owner_of.pop(key, None)
        if owner is not None:
            keys = self._owned[owner]
            keys.discard(key)
            if not keys:
                del self._owned[owner]

    def forget_owner(self, owner: str) -> int:
        """Drop every live entry written for ``owner``; returns how many there were."""
        return sum(self._drop(key) for key in list(self._owned.get(owner, ())))

    def read(self, key: str) -> bytes | None:
        """The live value of a storage key (namespace included), made most recently used."""
        value = self._live(key)
        if value is not None:
            self._store.move_to_end(key)
        return value

    def write(
        self, key: str, value: bytes, ttl: float | None = None, owner: str | None = None
    ) -> bool:
        """Store under a storage key; False when the value alone exceeds ``max_bytes``.

        ``owner`` (a tenant) lets ``forget_owner`` find the entry again.
        """
        self._drop(key)  # the old value is stale either way, even if the new one is too big
        size = len(key) + len(value)
        if size > self.max_bytes:
            return False
        now = time.monotonic()
        while self.nbytes + size > self.max_bytes:
            old_key, (old_value, expires) = self._store.popitem(last=False)
            self.nbytes -= len(old_key) + len(old_value)
            self._disown(old_key)
            if expires > now:  # dropping an already expired entry is not an eviction
                self.evictions += 1
        self._store[key] = (value, now + ttl if ttl else math.inf)
        self.nbytes += size
        if owner is not None:
            self._owner_of[key] = owner
            self._owned.setdefault(owner, set()).add(key)
        return True

    async def _get(self, key: str, encoding: str | None = None, _conn: Any = None) -> Any:
        return self.read(key)

    async def _gets(self, key: str, encoding: str | None = None, _conn: Any = None) -> Any:
        return await self._get(key, encoding)

    async def _multi_get(
        self, keys: list[str], encoding: str | None = None, _conn: Any = None
    ) -> list[Any]:
        return [await self._get(key, encoding) for key in keys]

    async def _set(
        self,
        key: str,
        value: bytes,
        ttl: float | None = None,
        _cas_token: Any = None,
        _conn: Any = None,
    ) -> bool:
        if _cas_token is not None and _cas_token != self._live(key):
            return False
        return self.write(key, value, ttl)

    async def _multi_set(
        self, pairs: list[tuple[str, bytes]], ttl: float | None = None, _conn: Any = None
    ) -> bool:
        for key, value in pairs:
            await self._set(key, value, ttl)
        return True

    async def _add(
        self, key: str, value: bytes, ttl: float | None = None, _conn: Any = None
    ) -> bool:
        if self._live(key) is not None:
            raise ValueError(f"Key {key} already exists, use .set to update the value")
        return await self._set(key, value, ttl)

    async def _exists(self, key: str, _conn: Any = None) -> bool:
        return self._live(key) is not None

    async def _expire(self, key: str, ttl: float, _conn: Any = None) -> bool:
        value = self._live(key)
        if value is None:
            return False
        self._store[key] = (value, time.monotonic() + ttl if ttl else math.inf)
        return True

    async def _delete(self, key: str, _conn: Any = None) -> int:
        return self._drop(key)

    async def _clear(self, namespace: str | None = None, _conn: Any = None) -> bool:
        for key in [k for k in self._store if not namespace or k.startswith(namespace)]:
            self._drop(key)
        return True

    async def _close(self, *args: Any, _conn: Any = None, **kwargs: Any) -> None:
        self._store.clear()
        self._owner_of.clear()
        self._owned.clear()
        self.nbytes = 0


def _redis_backend(url: str, namespace: str) -> BaseCache:
    """Build aiocache's RedisCache from a URL, configured for the hot path (see docstring)."""
    # lazy: redis-py is loaded only for a Redis backend (plugins.cache.aiocache_base)
    from aiocache.backends.redis import RedisCache

    class _RedisCache(RedisCache):  # type: ignore[misc,valid-type]
        async def _close(self, *args: Any, _conn: Any = None, **kwargs: Any) -> None:
            await self.client.aclose()  # aiocache calls the deprecated redis-py close()

    parts = urlsplit(url)
    query = parse_qs(parts.query)
    timeout = float(query.get("timeout", [DEFAULT_REDIS_TIMEOUT])[0])
    pool_kwargs: dict[str, Any] = {"socket_timeout": timeout}
    if parts.username:
        pool_kwargs["username"] = unquote(parts.username)
    db = parts.path.strip("/") or "0"
    return _RedisCache(
        serializer=NullSerializer(encoding=None),
        namespace=namespace,
        key_builder=_join_key,
        timeout=None,
        endpoint=parts.hostname or "127.0.0.1",
        port=parts.port or 6379,
        db=int(db),
        password=unquote(parts.password) if parts.password else None,
        create_connection_timeout=timeout,
        ssl=parts.scheme == "rediss",
        connection_pool_kwargs=pool_kwargs,
    )


class CacheStore:
    """Encrypting bytes cache with a fail-open contract: any failure is a miss, never raised.

    The cache is an optimisation in front of an upstream call, so a broken backend or an
    unreadable entry must cost a cache miss (counted and logged without key or value), never
    a failed request.
    """

    def __init__(
        self,
        *,
        url: str = "memory://",
        max_bytes: int = 256 * 2**20,
        keys: list[tuple[str, bytes]],
        namespace: str = "tollway:cache:",
    ) -> None:
        self.set_keys(keys)
        self._namespace = namespace
        self._stats = CacheStats()
        self._error_logged = -ERROR_LOG_EVERY
        self._errors_unlogged = 0
        self._instance = os.urandom(8).hex().encode()  # who holds a flight lock
        self._memory: BoundedMemoryCache | None = None
        scheme = urlsplit(url).scheme
        if scheme == "memory":
            self._memory = BoundedMemoryCache(
                max_bytes, namespace=namespace, key_builder=_join_key, timeout=None
            )
            self._backend: BaseCache = self._memory
        elif scheme in ("redis", "rediss"):
            self._backend = _redis_backend(url, namespace)
        else:
            raise ValueError(f"unsupported cache url scheme {scheme!r} (memory:// or redis://)")
        self._kind = scheme

    def set_keys(self, keys: list[tuple[str, bytes]]) -> None:
        """Replace the keys (a policy reload rotating them): the first encrypts new entries,
        all decrypt; entries under a key no longer listed become misses."""
        if not keys:
            raise ValueError("CacheStore needs at least one (key_id, key) pair")
        aeads: dict[bytes, AESGCM] = {}
        for key_id, key in keys:
            kid = key_id.encode()
            if not 0 < len(kid) < 256:
                raise ValueError("cache key ids must be 1..255 bytes of UTF-8")
            if len(key) != KEY_LEN:
                raise ValueError(f"cache key {key_id!r} must be 32 bytes (AES-256)")
            if kid in aeads:
                raise ValueError(f"duplicate cache key id {key_id!r}")
            aeads[kid] = AESGCM(bytes(key))
        first = keys[0][0].encode()
        self._aeads = aeads
        self._header = bytes([FORMAT_VERSION, len(first)]) + first
        self._sealer = aeads[first]

    @property
    def stats(self) -> CacheStats:
        """Counters; size fields are refreshed from the memory backend on each read."""
        if self._memory is not None:
            self._stats.entries = len(self._memory)
            self._stats.bytes = self._memory.nbytes
            self._stats.evictions = self._memory.evictions
        return self._stats

    def raw_backend(self) -> BaseCache:
        """The aiocache object holding the ciphertext (tests read and tamper with it)."""
        return self._backend

    def _aad(self, header: bytes, key: str) -> bytes:
        return header + f"{self._namespace}{key}".encode()

    def _seal(self, key: str, value: bytes) -> bytes:
        nonce = os.urandom(NONCE_LEN)
        header = self._header
        return header + nonce + self._sealer.encrypt(nonce, value, self._aad(header, key))

    def _open(self, key: str, blob: Any) -> bytes | None:
        if not isinstance(blob, bytes) or len(blob) < 2 or blob[0] != FORMAT_VERSION:
            return None
        end = 2 + blob[1]
        aead = self._aeads.get(blob[2:end])
        if aead is None or len(blob) < end + NONCE_LEN + TAG_LEN:
            return None
        try:
            return aead.decrypt(
                blob[end : end + NONCE_LEN], blob[end + NONCE_LEN :], self._aad(blob[:end], key)
            )
        except InvalidTag:
            return None

    def _backend_error(self, op: str, exc: Exception) -> None:
        self._stats.errors += 1
        # One line per interval, not per request: a Redis outage fails every lookup, and
        # each one is already a miss (the request goes to the provider).
        now = time.monotonic()
        if now - self._error_logged < ERROR_LOG_EVERY:
            self._errors_unlogged += 1
            return
        self._error_logged = now
        more, self._errors_unlogged = self._errors_unlogged, 0
        # Only the exception type: messages can embed keys or payloads.
        log.warning(
            "response cache %s failed on %s backend: %s (%d more failures since the last line)",
            op,
            self._kind,
            type(exc).__name__,
            more,
        )

    async def get(self, key: str, count: bool = True) -> bytes | None:
        """The cached plaintext, or None on miss, expiry, undecryptable entry or backend error.

        ``count=False``: a poll while waiting for another instance, not a lookup: the hit and
        miss counters are left alone."""
        memory = self._memory
        try:
            if memory is not None:  # our own backend, called directly: see the module docstring
                blob = memory.read(self._namespace + key)
            else:
                blob = await self._backend.get(key)
        except Exception as exc:
            self._backend_error("get", exc)
            blob = None
        if blob is not None:
            value = self._open(key, blob)
            if value is not None:
                if count:
                    self._stats.hits += 1
                return value
            self._stats.decrypt_failures += 1
            log.debug("response cache entry failed to decrypt; treated as a miss")
        if count:
            self._stats.misses += 1
        return None

    async def set(self, key: str, value: bytes, ttl: float, owner: str | None = None) -> None:
        """Encrypt and store; a non-positive ttl deletes instead (the entry is already stale).

        ``owner`` names the tenant the entry belongs to, so ``forget_owner`` can delete it.
        """
        if ttl <= 0:
            await self.delete(key)
            return
        blob = self._seal(key, value)
        memory = self._memory
        try:
            if memory is not None:
                stored = memory.write(self._namespace + key, blob, ttl, owner)
            else:
                # psetex needs >= 1 ms; a float ttl makes aiocache's redis backend use ms precision
                stored = await self._backend.set(key, blob, ttl=max(float(ttl), 0.001))
                if owner is not None:  # a set per owner, living as long as its longest entry
                    index = f"{self._namespace}owner:{owner}"
                    seconds = max(1, math.ceil(ttl))
                    async with self._backend.client.pipeline(transaction=False) as pipe:
                        pipe.sadd(index, self._namespace + key)
                        pipe.expire(index, seconds, gt=True)  # longer than the set's TTL, or
                        pipe.expire(index, seconds, nx=True)  # the set had none: one round trip
                        await pipe.execute()
        except Exception as exc:
            self._backend_error("set", exc)
            return
        if stored:
            self._stats.sets += 1
        else:
            self._stats.oversize += 1

    @property
    def shared(self) -> bool:
        """Whether other instances see this store (Redis), so a flight lock means something."""
        return self._memory is None

    async def claim(self, key: str, ttl: float) -> str:
        """Take the flight lock of ``key`` for ``ttl`` seconds. ``"lead"``: this request calls
        the provider; ``"here"``: another request of this instance does (local coalescing
        takes care of it); ``"elsewhere"``: another instance's request does. A backend failure
        answers "lead": the cache fails open, never blocks a request."""
        try:
            holder = await self._backend.raw(
                "set",
                f"{self._namespace}flight:{key}",
                self._instance,
                nx=True,
                get=True,
                px=max(1, int(ttl * 1000)),
            )
        except Exception as exc:
            self._backend_error("claim", exc)
            return "lead"
        if holder is None:
            return "lead"
        return "here" if holder == self._instance else "elsewhere"

    async def release(self, key: str) -> None:
        try:
            await self._backend.raw("delete", f"{self._namespace}flight:{key}")
        except Exception as exc:
            self._backend_error("release", exc)

    async def await_flight(self, key: str, longest: float) -> bytes | None:
        """Wait while another instance's request for ``key`` is in flight; its stored answer,
        or None when it ended without one (an error, a reply not to be stored) or took longer
        than ``longest`` seconds. Polls: a few Redis reads per waiting request, no subscription."""
        lock = f"{self._namespace}flight:{key}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + longest
        delay = 0.005
        while loop.time() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            value = await self.get(key, count=False)
            if value is None:
                try:
                    if await self._backend.raw("exists", lock):
                        continue
                except Exception as exc:
                    self._backend_error("await_flight", exc)
                    return None
                value = await self.get(key, count=False)  # stored just before the release
                if value is None:
                    return None
            self._stats.coalesced += 1
            return value
        return None

    async def forget_owner(self, owner: str) -> int:
        """Delete every entry stored for ``owner``; returns how many were deleted.

        Unlike reads and writes this raises on a backend failure: a deletion the operator
        asked for must not be reported done when it was not.
        """
        if self._memory is not None:
            return self._memory.forget_owner(owner)
        index = f"{self._namespace}owner:{owner}"
        keys = await self._backend.raw("smembers", index)
        deleted = int(await self._backend.raw("delete", *keys)) if keys else 0
        await self._backend.raw("delete", index)
        return deleted

    async def delete(self, key: str) -> None:
        try:
            await self._backend.delete(key)
        except Exception as exc:
            self._backend_error("delete", exc)

    async def close(self) -> None:
        try:
            await self._backend.close()
        except Exception as exc:
            self._backend_error("close", exc)
