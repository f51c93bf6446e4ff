"""The in-process cache backend: bytes bounded by their total size, least recently used out.

Why not aiocache's ``SimpleMemoryCache``: it never bounds its size, and arms one timer per
entry for its TTL. Expiry here is lazy (checked on access and when an entry reaches the LRU
end): no timer handles to leak or cancel, and expired entries are the first to go once they
stop being used. Every method is synchronous inside, so each operation is atomic on the event
loop. The flight lock has no meaning within one process (no other instance can hold it): the
batching plugin coalesces this instance's own identical requests.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict


class MemoryBackend:
    """``CacheBackend`` in process memory, bounded by ``max_bytes`` (key + value lengths)."""

    kind = "memory"
    distributed = False

    def __init__(self, max_bytes: int, namespace: str = "") -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self.namespace = namespace
        # storage key (namespace + key) -> (value, monotonic expiry)
        self._store: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self.nbytes = 0
        self.evictions = 0
        # which tenant an entry belongs to, kept exactly as long as the entry (forget_owner)
        self._owner_of: dict[str, str] = {}
        self._owned: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._store)

    async def get(self, key: str) -> bytes | None:
        """The live value, made most recently used."""
        skey = self.namespace + key
        item = self._store.get(skey)
        if item is None:
            return None
        if item[1] <= time.monotonic():
            self._drop(skey)
            return None
        self._store.move_to_end(skey)
        return item[0]

    async def set(
        self, key: str, value: bytes, ttl: float | None = None, owner: str | None = None
    ) -> bool:
        skey = self.namespace + key
        self._drop(skey)  # the old value is stale either way, even if the new one is too big
        size = len(skey) + len(value)
        if size > self.max_bytes:
            return False
        now = time.monotonic()
        while self.nbytes + size > self.max_bytes:
            old_key, (old_value, expires) = self._store.popitem(last=False)
            self.nbytes -= len(old_key) + len(old_value)
            self._disown(old_key)
            if expires > now:  # dropping an already expired entry is not an eviction
                self.evictions += 1
        self._store[skey] = (value, now + ttl if ttl else math.inf)
        self.nbytes += size
        if owner is not None:
            self._owner_of[skey] = owner
            self._owned.setdefault(owner, set()).add(skey)
        return True

    async def delete(self, key: str) -> int:
        return self._drop(self.namespace + key)

    async def forget_owner(self, owner: str) -> int:
        return sum(self._drop(skey) for skey in list(self._owned.get(owner, ())))

    async def claim(self, key: str, holder: bytes, ttl: float) -> tuple[bytes | None, bytes | None]:
        return await self.get(key), None  # no other instance shares this store: no lock

    async def release(self, key: str, holder: bytes) -> None:
        return None

    async def in_flight(self, key: str) -> bool:
        return False

    def footprint(self) -> tuple[int, int, int]:
        return len(self._store), self.nbytes, self.evictions

    async def close(self) -> None:
        self._store.clear()
        self._owner_of.clear()
        self._owned.clear()
        self.nbytes = 0

    def _drop(self, skey: str) -> int:
        item = self._store.pop(skey, None)
        if item is None:
            return 0
        self.nbytes -= len(skey) + len(item[0])
        self._disown(skey)
        return 1

    def _disown(self, skey: str) -> None:
        owner = self._owner_of.pop(skey, None)
        if owner is not None:
            keys = self._owned[owner]
            keys.discard(skey)
            if not keys:
                del self._owned[owner]
