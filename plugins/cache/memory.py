"""The in-process cache backend: the core's ``OwnedStore`` (``proxy.ownedstore``), bytes
bounded by their total size, least recently used out, with a TTL and an owner per entry.

Why not aiocache's ``SimpleMemoryCache``: it never bounds its size, and arms one timer per
entry for its TTL; ``OwnedStore`` expires lazily, with no timer to leak or cancel. The flight
lock has no meaning within one process (no other instance can hold it): the batching plugin
coalesces this instance's own identical requests.
"""

from __future__ import annotations

from proxy.ownedstore import OwnedStore


class MemoryBackend(OwnedStore):
    """``CacheBackend`` in process memory, bounded by ``max_bytes`` (key + value lengths)."""

    distributed = False

    async def claim(self, key: str, holder: bytes, ttl: float) -> tuple[bytes | None, bytes | None]:
        return await self.get(key), None  # no other instance shares this store: no lock

    async def release(self, key: str, holder: bytes) -> None:
        return None

    async def in_flight(self, key: str) -> bool:
        return False
