"""Bytes in process memory under string keys, each with a TTL and an owner: bounded, LRU.

Plugins that keep user data in process (the response cache, the Responses API's stored
responses) need the same thing: opaque values (already sealed, ``proxy.sealing``) bounded by
their total size, least recently used out, each expiring after its TTL, and an index of which
tenant wrote which value, so a user's values can be listed and deleted (``DELETE
/admin/users/{user}/data``). The index lives exactly as long as the values: an evicted,
expired or overwritten value leaves nothing behind in it.

Expiry is lazy (checked on access, and when a value reaches the LRU end): no timer per entry
to leak or cancel, and expired values are the first to go once they stop being used. Every
method is synchronous inside, so each operation is atomic on the event loop. ``clock``
(monotonic seconds) is injectable so expiry can be tested without waiting.

Why in the core: two plugins need it, and a plugin never imports another plugin; a third-party
plugin that keeps user data can use it too. Each plugin subclasses it with what only it needs
(the cache's flight lock, which means nothing in one process).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class OwnedStore:
    """Values bounded by ``max_bytes`` (key + value lengths), each with a TTL and an owner.

    Keys are given without the ``namespace``, which is prepended to every stored key (so
    sizes, and a Redis twin's keys, count it too).
    """

    kind = "memory"
    """The URL scheme, for log lines."""

    def __init__(
        self, max_bytes: int, namespace: str = "", clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self.namespace = namespace
        self.clock = clock
        # storage key (namespace + key) -> (value, expiry on ``clock``)
        self._store: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self.nbytes = 0
        self.evictions = 0
        # which tenant a value belongs to, kept exactly as long as the value
        self._owner_of: dict[str, str] = {}
        self._owned: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._store)

    def raw(self) -> list[bytes]:
        """Every value as held (tests check that no plaintext is among them)."""
        return [value for value, _ in self._store.values()]

    async def get(self, key: str) -> bytes | None:
        """The live value, made most recently used; None when absent or expired."""
        skey = self.namespace + key
        item = self._store.get(skey)
        if item is None:
            return None
        if item[1] <= self.clock():
            self._drop(skey)
            return None
        self._store.move_to_end(skey)
        return item[0]

    async def set(
        self,
        key: str,
        value: bytes,
        ttl: float | None = None,
        owner: str | None = None,
        replace: bool = True,
    ) -> bool:
        """Store ``value`` for ``ttl`` seconds (None or 0: until evicted), for ``owner`` (None:
        no one's). False when it was not stored: it can never fit (the old value is gone
        then), or ``replace`` is false and a live value is there (it stays)."""
        if not replace and await self.get(key) is not None:
            return False
        skey = self.namespace + key
        self._drop(skey)  # the old value is stale either way, even if the new one is too big
        size = len(skey) + len(value)
        if size > self.max_bytes:
            return False
        now = self.clock()
        while self.nbytes + size > self.max_bytes:
            old_key, (old_value, expires) = self._store.popitem(last=False)
            self.nbytes -= len(old_key) + len(old_value)
            self._disown(old_key)
            if expires > now:  # dropping an already expired value is not an eviction
                self.evictions += 1
        self._store[skey] = (value, now + ttl if ttl else math.inf)
        self.nbytes += size
        if owner is not None:
            self._owner_of[skey] = owner
            self._owned.setdefault(owner, set()).add(skey)
        return True

    async def delete(self, key: str, owner: str | None = None) -> int:
        """Delete a value; how many there were (0 or 1). ``owner`` is not needed here (the
        index is per key); a Redis twin uses it to find the owner's index."""
        return self._drop(self.namespace + key)

    async def owned(self, owner: str) -> list[str]:
        """The keys (without namespace) ``owner`` may still have values under."""
        cut = len(self.namespace)
        return [skey[cut:] for skey in self._owned.get(owner, ())]

    async def forget_owner(self, owner: str) -> int:
        """Delete every value set for ``owner``; how many of them were live."""
        now = self.clock()
        live = 0
        for skey in list(self._owned.get(owner, ())):
            item = self._store.get(skey)
            live += item is not None and item[1] > now
            self._drop(skey)
        return live

    def footprint(self) -> tuple[int, int, int]:
        """(values, bytes, evictions)."""
        return len(self._store), self.nbytes, self.evictions

    async def close(self) -> None:
        """Drop every value."""
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
