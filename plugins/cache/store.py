"""The response cache's store: entries encrypted at rest, counted, and failing open.

Cached responses are user data (prompts, completions), so they are encrypted at rest with
AES-256-GCM (``proxy.sealing``, shared with other plugins that keep user data) before a
backend (``plugins.cache.backend``: in process, or Redis) keeps them. Entry format::

    version (1 byte = 0x01) | len(key_id) (1 byte) | key_id | nonce (12 bytes) | ciphertext+tag

The associated data is the header plus the full storage key (namespace + cache key), so an
entry copied under another key, a tampered entry, or one written with a key id we no longer
hold all fail authentication and read as a miss (``stats.decrypt_failures``). The first key
of the key ring encrypts; all keys decrypt, so rotation is "prepend the new key, drop the old
one after the longest TTL".

Why a layer above the backend rather than an aiocache serializer: a serializer sees only the
value, and the associated data needs the key. The layer also turns every backend failure into
a counted miss, logged once per interval.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

from plugins.cache.backend import CacheBackend, open_backend
from proxy.failurelog import FailureLog
from proxy.sealing import FORMAT_VERSION, KEY_LEN, NONCE_LEN, TAG_LEN, Sealer
from proxy.sealing import parse_key as _parse_key

__all__ = ["FORMAT_VERSION", "KEY_LEN", "NONCE_LEN", "TAG_LEN", "CacheStore", "parse_key"]

log = logging.getLogger(__name__)

Claim = Literal["lead", "stored", "wait"]


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
    """Decode a 32-byte AES key given as 64 hex characters or base64 (``proxy.sealing``).

    The error message never echoes the secret, only its length, since it ends up in logs.
    """
    return _parse_key(secret, "cache encryption key")


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
        self._sealer = Sealer(keys, namespace)  # raises on an empty or malformed key ring
        self._stats = CacheStats()
        self._failures = FailureLog(log, "response cache")
        self._instance = os.urandom(8).hex().encode()  # who holds a flight lock
        # keys this instance has in flight -> (the answer to come, whether another instance
        # gave it): the first request for a key claims or watches in Redis, and its twins
        # here wait on that future with no round trip of their own
        self._flights: dict[str, asyncio.Future[tuple[bytes | None, bool]]] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self.backend: CacheBackend = open_backend(url, namespace, max_bytes)
        """Where the ciphertext lives (tests read and tamper with it through this too)."""

    def set_keys(self, keys: list[tuple[str, bytes]]) -> None:
        """Replace the keys (a policy reload rotating them): the first encrypts new entries,
        all decrypt; entries under a key no longer listed become misses."""
        self._sealer.set_keys(keys)

    @property
    def stats(self) -> CacheStats:
        """Counters; size fields are refreshed from the backend on each read (zeros on Redis,
        where the server owns them)."""
        st = self._stats
        st.entries, st.bytes, st.evictions = self.backend.footprint()
        return st

    def _seal(self, key: str, value: bytes) -> bytes:
        return self._sealer.seal(key, value)

    def _open(self, key: str, blob: Any) -> bytes | None:
        return self._sealer.open(key, blob)

    def _backend_error(self, op: str, exc: Exception) -> None:
        # counted, and logged once per interval: a Redis outage fails every lookup, and each
        # one is already a miss (the request goes to the provider)
        self._stats.errors += 1
        self._failures.failed(op, self.backend.kind, exc)

    async def get(self, key: str, count: bool = True) -> bytes | None:
        """The cached plaintext, or None on miss, expiry, undecryptable entry or backend error.

        ``count=False``: a poll while waiting for another instance, not a lookup: the hit and
        miss counters are left alone."""
        try:
            blob = await self.backend.get(key)
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
        try:
            stored = await self.backend.set(key, self._seal(key, value), ttl, owner)
        except Exception as exc:
            self._backend_error("set", exc)
            return
        if stored:
            self._stats.sets += 1
        else:
            self._stats.oversize += 1

    @property
    def distributed(self) -> bool:
        """Whether other instances see this store (Redis), so a flight lock means something."""
        return self.backend.distributed

    async def claim(self, key: str, ttl: float) -> tuple[Claim, bytes | None]:
        """After a miss, decide who calls the provider for ``key``; the lock lives ``ttl``
        seconds at most.

        * ``("lead", None)``: this request calls the provider and must ``release`` the key
          (whatever happens), after storing the answer. A backend failure also leads: the
          cache fails open, never blocks a request.
        * ``("stored", answer)``: the answer was stored since the lookup missed (checked in
          the same atomic step as the lock, so a leader that stores and releases between our
          lookup and our claim is never missed).
        * ``("wait", None)``: a request is in flight for ``key``, here or on another
          instance: ``await_flight`` gives its answer.
        """
        if key in self._flights:
            return "wait", None  # a twin of this instance leads or watches: no round trip
        self._flights[key] = asyncio.get_running_loop().create_future()
        try:
            blob, holder = await self.backend.claim(key, self._instance, ttl)
        except Exception as exc:
            self._backend_error("claim", exc)
            return "lead", None
        except BaseException:
            self._settle(key, None)  # cancelled: the twins waiting here ask for themselves
            raise
        if blob is not None:
            value = self._open(key, blob)
            if value is None:  # unreadable (a retired key): lead, and overwrite it
                self._stats.decrypt_failures += 1
                return "lead", None
            self._settle(key, value)
            return "stored", value
        if holder is None or holder == self._instance:
            # taken now, or left by a flight of ours that could not release it (every live
            # flight of this instance is in ``_flights``): ours to lead either way
            return "lead", None
        watcher = asyncio.get_running_loop().create_task(self._watch(key, ttl))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return "wait", None

    async def release(self, key: str, answer: bytes | None = None) -> None:
        """End this instance's flight of ``key`` (after its answer was stored, if any): drop
        the lock, and hand ``answer`` (None: ask the provider) to the twins waiting here."""
        try:
            await self.backend.release(key, self._instance)
        except Exception as exc:
            self._backend_error("release", exc)
        finally:
            self._settle(key, answer)

    async def await_flight(self, key: str, longest: float) -> bytes | None:
        """The answer of the flight ``claim`` said to wait for, or None when it ended without
        one (an error, a reply not to be stored) or took longer than ``longest`` seconds."""
        future = self._flights.get(key)
        if future is None:
            return await self.get(key, count=False)
        try:
            value, remote = await asyncio.wait_for(asyncio.shield(future), longest)
        except TimeoutError:
            return None
        if value is not None and remote:
            self._stats.coalesced += 1
        return value

    def _settle(self, key: str, answer: bytes | None, remote: bool = False) -> None:
        future = self._flights.pop(key, None)
        if future is not None and not future.done():
            future.set_result((answer, remote))

    async def _watch(self, key: str, longest: float) -> None:
        """Poll while another instance's request for ``key`` is in flight (a few Redis reads
        for all of this instance's waiters together, no subscription); settle with its stored
        answer, or None when it ended without one or took longer than ``longest``."""
        answer = None
        try:
            answer = await self._poll(key, longest)
        finally:
            self._settle(key, answer, remote=True)

    async def _poll(self, key: str, longest: float) -> bytes | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + longest
        delay = 0.005
        while loop.time() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            value = await self.get(key, count=False)
            if value is not None:
                return value
            try:
                if await self.backend.in_flight(key):
                    continue
            except Exception as exc:
                self._backend_error("await_flight", exc)
                return None
            return await self.get(key, count=False)  # stored just before the release
        return None

    async def forget_owner(self, owner: str) -> int:
        """Delete every entry stored for ``owner``; returns how many were deleted.

        Unlike reads and writes this raises on a backend failure: a deletion the operator
        asked for must not be reported done when it was not.
        """
        return await self.backend.forget_owner(owner)

    async def delete(self, key: str) -> None:
        try:
            await self.backend.delete(key)
        except Exception as exc:
            self._backend_error("delete", exc)

    async def close(self) -> None:
        for watcher in list(self._watchers):
            watcher.cancel()
        try:
            await self.backend.close()
        except Exception as exc:
            self._backend_error("close", exc)
