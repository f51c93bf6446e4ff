"""Rate-limit windows: an in-process sliding-window counter, or the limits library on Redis.

Each speaks one interface, ``Windows``: the ``limits`` strategy calls (``test``, ``hit``,
``get_window_stats``) for one window, and ``admit`` for all of a request's layers at once.
``open_windows`` picks the implementation when the plugin starts, so the plugin never asks which
one runs. ``admit_now`` lets the in-process counter decide in one synchronous pass (no coroutine
on the hot path); a store that must ask Redis answers None there and decides in ``admit``.

The algorithm is the sliding-window counter (the previous
fixed window's count, weighted by how much of it still overlaps the sliding window, plus the
current window's count): O(1) time and two integers per key, where a moving-window log keeps one
timestamp per request (10,000/day per user would be 10,000 entries per user).

Why not the library's own in-memory storage: measured here, its async MemoryStorage re-arms an
expiry task that hops to a thread per key on nearly every call, and its per-call cost was
~6-13 µs; this class costs about 1 µs a call and never leaves the event loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from proxy.statewatch import StateWatch, is_state_error

if TYPE_CHECKING:
    # the library is imported where Redis windows are built: importing ``limits`` loads its
    # every storage (~50 ms), which a memory-only gateway and ``tollway --help`` do not need
    import limits


class WindowStats(NamedTuple):
    reset_time: float  # UNIX time at which one more request would pass
    remaining: int


class Admit(NamedTuple):
    """Outcome of checking several layers at once.

    ``failed`` is the index of the first layer that refused (-1 if admitted); ``layer`` names
    the layer the numbers describe: the refusing one, or the most constraining after the hit.
    """

    failed: int
    layer: int
    remaining: int
    wait: float  # seconds until one more request fits in that layer


Layer = tuple[int, float, tuple[str, ...]]
"""(limit, period in seconds, identifiers such as ("user", "alice"))."""


class BoundLayers:
    """A caller's layers and, once ``MemoryWindows.admit_now`` has seen them, their counters.

    A caller's next request then goes straight to its counters instead of building a key and
    looking it up per layer (the largest part of admission). The counters stay valid until the
    windows sweep stale keys (``MemoryWindows.generation``), which would orphan a removed one.
    """

    __slots__ = ("counters", "generation", "groups", "layers")

    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers
        # the layers grouped by period: [(period, [(limit, counter, layer index), ...]), ...]
        self.groups: list[tuple[float, list[tuple[int, list[int], int]]]] = []
        self.counters: list[list[int]] = []  # one per layer, in order
        self.generation = -1


_ADMIT_EMPTY = Admit(-1, -1, 0, 0.0)


class Windows(Protocol):
    """Rate-limit windows, wherever they are kept: what the limits plugin asks."""

    def admit_now(self, bound: BoundLayers) -> Admit | None:
        """Check every layer and count the request in all of them only if all admit it, when
        that can be decided without awaiting; None when it needs the shared store: then
        ``await admit(bound)``. Synchronous so the in-process windows cost no coroutine."""
        ...

    async def admit(self, bound: BoundLayers) -> Admit:
        """As ``admit_now``, always decided."""
        ...

    async def test(self, item: limits.RateLimitItem, *ids: str, cost: int = 1) -> bool:
        """Whether ``cost`` more fits in the window of ``item`` for ``ids`` (nothing counted)."""
        ...

    async def hit(self, item: limits.RateLimitItem, *ids: str, cost: int = 1) -> bool:
        """Count ``cost`` if it fits; False (nothing counted) if not."""
        ...

    async def get_window_stats(self, item: limits.RateLimitItem, *ids: str) -> WindowStats:
        """When one more request fits, and how many remain."""
        ...

    async def close(self) -> None:
        """Release connections (at shutdown)."""
        ...


class MemoryWindows:
    """Sliding-window counters in a dict: ``{key: [window_index, previous, current]}``."""

    SWEEP_EVERY = 50_000

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._counts: dict[tuple[object, ...], list[int]] = {}
        self._ops = 0
        self.generation = 0  # bumped by a sweep: every BoundLayers must look its counters up again

    def _state(
        self, item: limits.RateLimitItem, ids: tuple[str, ...], now: float
    ) -> tuple[list[int], float, float]:
        return self._state_at(item.amount, float(item.get_expiry()), ids, now)

    def _state_at(
        self, amount: int, period: float, ids: tuple[str, ...], now: float
    ) -> tuple[list[int], float, float]:
        index = int(now // period)
        key = (amount, period, ids)
        st = self._counts.get(key)
        if st is None:
            st = self._counts[key] = [index, 0, 0]
            self._ops += 1
            if self._ops >= self.SWEEP_EVERY:
                self._sweep(now)
        elif st[0] != index:
            self._roll(st, index)
        elapsed = now - index * period
        return st, period, elapsed

    @staticmethod
    def _roll(st: list[int], index: int) -> None:
        """Roll a counter forward to window ``index``: the current window becomes the previous
        one (or both expire). ``admit_now`` inlines these three lines on its hot path."""
        st[1] = st[2] if st[0] == index - 1 else 0
        st[2] = 0
        st[0] = index

    def _resolve(self, bound: BoundLayers, now: float) -> None:
        groups: dict[float, list[tuple[int, list[int], int]]] = {}
        counters = []
        for i, (amount, period, ids) in enumerate(bound.layers):
            st = self._state_at(amount, period, ids, now)[0]
            groups.setdefault(period, []).append((amount, st, i))
            counters.append(st)
        bound.groups = list(groups.items())
        bound.counters = counters
        bound.generation = self.generation

    async def admit(self, bound: BoundLayers, cost: int = 1) -> Admit:
        return self.admit_now(bound, cost)

    async def close(self) -> None:
        """Nothing to release: the counters are plain memory."""

    def admit_now(self, bound: BoundLayers, cost: int = 1) -> Admit:
        """Check every layer, then count the request in all of them, in one synchronous pass:
        nothing is consumed unless every layer admits it, and no other request can interleave
        (the event loop does not switch inside). Always decided (``Windows.admit_now``)."""
        now = self.clock()
        if bound.generation != self.generation:
            self._resolve(bound, now)
        best, best_left = -1, math.inf
        for period, members in bound.groups:  # layers of one period share their window maths
            index = int(now // period)
            weight = 1.0 - (now - index * period) / period  # of the previous window's count
            for amount, st, i in members:
                if st[0] != index:  # _roll, inlined: this runs per layer per request
                    st[1] = st[2] if st[0] == index - 1 else 0
                    st[2] = 0
                    st[0] = index
                left = amount - st[1] * weight - st[2] - cost
                if left < best_left:
                    if left < 0:
                        return self._refuse(bound, now, cost)
                    best, best_left = i, left
        if best < 0:
            return _ADMIT_EMPTY
        counters = bound.counters
        for st in counters:
            st[2] += cost
        period = bound.layers[best][1]
        elapsed = now - int(now // period) * period
        wait = self._full_reset(counters[best], period, elapsed)
        return Admit(-1, best, math.floor(best_left), wait)

    def _refuse(self, bound: BoundLayers, now: float, cost: int) -> Admit:
        """The refusal, naming the full layer that frees up last: a request fits only once
        every layer admits it, so that layer's wait is the honest Retry-After (the first
        full layer found could free up sooner and send the client into another 429)."""
        worst, worst_wait = -1, -1.0
        for i, ((amount, period, _), st) in enumerate(
            zip(bound.layers, bound.counters, strict=True)
        ):
            index = int(now // period)
            if st[0] != index:  # not yet rolled forward if the pass stopped before this layer
                self._roll(st, index)
            elapsed = now - index * period
            if self._weighted(st, period, elapsed) + cost > amount:
                wait = self._wait(st, amount, period, elapsed)
                if wait > worst_wait:
                    worst, worst_wait = i, wait
        return Admit(worst, worst, 0, worst_wait)

    @staticmethod
    def _full_reset(st: list[int], period: float, elapsed: float) -> float:
        """Seconds until the layer is back to its whole limit (OpenAI's reset header)."""
        if st[2] > 0:
            return 2 * period - elapsed
        if st[1] > 0:
            return period - elapsed
        return 0.0

    @staticmethod
    def _weighted(st: list[int], period: float, elapsed: float) -> float:
        return st[1] * (1.0 - elapsed / period) + st[2]

    async def test(self, item: limits.RateLimitItem, *ids: str, cost: int = 1) -> bool:
        st, period, elapsed = self._state(item, ids, self.clock())
        return self._weighted(st, period, elapsed) + cost <= item.amount

    async def hit(self, item: limits.RateLimitItem, *ids: str, cost: int = 1) -> bool:
        st, period, elapsed = self._state(item, ids, self.clock())
        if self._weighted(st, period, elapsed) + cost > item.amount:
            return False
        st[2] += cost
        return True

    async def get_window_stats(self, item: limits.RateLimitItem, *ids: str) -> WindowStats:
        now = self.clock()
        st, period, elapsed = self._state(item, ids, now)
        weighted = self._weighted(st, period, elapsed)
        remaining = max(0, math.floor(item.amount - weighted))
        return WindowStats(now + self._wait(st, item.amount, period, elapsed), remaining)

    @staticmethod
    def _wait(st: list[int], limit: int, period: float, elapsed: float) -> float:
        """Seconds until one more request fits (0 if it fits now)."""
        prev, cur = st[1], st[2]
        if prev * (1.0 - elapsed / period) + cur + 1 <= limit:
            return 0.0
        if cur + 1 <= limit and prev > 0:
            # within this window, as the previous window's weight decays
            return max(0.0, period * (1.0 - (limit - 1 - cur) / prev) - elapsed)
        # next window: this window's count becomes the decaying previous one
        until_next = period - elapsed
        if cur <= 0:
            return until_next
        return until_next + max(0.0, period * (1.0 - (limit - 1) / cur))

    def _sweep(self, now: float) -> None:
        """Drop counters whose windows have both expired (keeps memory bounded by live keys)."""
        self._ops = 0
        self.generation += 1
        stale = [
            k
            for k, st in self._counts.items()
            if int(now // float(k[1])) > st[0] + 1  # type: ignore[arg-type]
        ]
        for k in stale:
            del self._counts[k]

    def __len__(self) -> int:
        return len(self._counts)


class RedisWindows:
    """The windows on Redis, shared by every instance: the ``limits`` library's sliding-window
    counter over its Redis storage (redis-py, loaded only when this is built)."""

    def __init__(self, url: str) -> None:
        from limits import RateLimitItemPerSecond
        from limits.aio.strategies import SlidingWindowCounterRateLimiter
        from limits.storage import storage_from_string

        self._storage: Any = storage_from_string(f"async+{url}", implementation="redispy")
        self.limiter = SlidingWindowCounterRateLimiter(self._storage)
        self._item = RateLimitItemPerSecond  # kept: no import statement per request

    def admit_now(self, bound: BoundLayers) -> None:
        """Never decided without Redis: see ``admit``."""
        return None

    async def admit(self, bound: BoundLayers) -> Admit:
        """All layers on the shared storage: test every one, then hit every one."""
        limiter = self.limiter
        layers = bound.layers
        items = [self._item(a, round(p)) for a, p, _ in layers]
        refused: Admit | None = None
        for i, (item, (_, _, ids)) in enumerate(zip(items, layers, strict=True)):
            if not await limiter.test(item, *ids):
                # as in memory: name the full layer that frees up last (the honest Retry-After)
                stats = await limiter.get_window_stats(item, *ids)
                wait = max(0.0, stats.reset_time - time.time())
                if refused is None or wait > refused.wait:
                    refused = Admit(i, i, 0, wait)
        if refused is not None:
            return refused
        for i, (item, (_, _, ids)) in enumerate(zip(items, layers, strict=True)):
            if not await limiter.hit(item, *ids):
                stats = await limiter.get_window_stats(item, *ids)
                return Admit(i, i, 0, max(0.0, stats.reset_time - time.time()))
        best = _ADMIT_EMPTY
        for i, (item, (_, _, ids)) in enumerate(zip(items, layers, strict=True)):
            stats = await limiter.get_window_stats(item, *ids)
            if best.layer < 0 or stats.remaining < best.remaining:
                best = Admit(-1, i, stats.remaining, max(0.0, stats.reset_time - time.time()))
        return best

    async def test(self, item: limits.RateLimitItem, *ids: str, cost: int = 1) -> bool:
        return await self.limiter.test(item, *ids, cost=cost)

    async def hit(self, item: limits.RateLimitItem, *ids: str, cost: int = 1) -> bool:
        return await self.limiter.hit(item, *ids, cost=cost)

    async def get_window_stats(self, item: limits.RateLimitItem, *ids: str) -> WindowStats:
        stats = await self.limiter.get_window_stats(item, *ids)
        return WindowStats(stats.reset_time, stats.remaining)

    async def close(self) -> None:
        """Close the connection pool of the library's redis-py client."""
        await self._storage.bridge.storage.aclose()


class FailoverWindows:
    """The shared windows on Redis, or this instance's own (``MemoryWindows``) while the shared
    state is unreachable: each instance then enforces every limit alone (a deployment of N
    instances admits up to N times a limit for the outage) instead of failing requests. Whether
    a request may be served that way at all is the limits plugin's decision
    (``state.on_unavailable``). Rate windows are not restored after an outage: they are at most
    one period long, and the shared ones resume where Redis left them (or empty)."""

    def __init__(self, remote: Windows, watch: StateWatch) -> None:
        self.remote = remote
        self.local = MemoryWindows()
        self.watch = watch

    def _lost(self, exc: Exception) -> None:
        if not is_state_error(exc):
            raise exc
        self.watch.failed(exc)

    def admit_now(self, bound: BoundLayers) -> Admit | None:
        """Decided here while Redis is unreachable (this instance alone); else None."""
        return None if self.watch.available else self.local.admit_now(bound)

    async def admit(self, bound: BoundLayers) -> Admit:
        if self.watch.available:
            try:
                return await self.remote.admit(bound)
            except Exception as e:
                self._lost(e)
        return self.local.admit_now(bound)

    async def test(self, item: limits.RateLimitItem, *ids: str, cost: int = 1) -> bool:
        if self.watch.available:
            try:
                return await self.remote.test(item, *ids, cost=cost)
            except Exception as e:
                self._lost(e)
        return await self.local.test(item, *ids, cost=cost)

    async def hit(self, item: limits.RateLimitItem, *ids: str, cost: int = 1) -> bool:
        if self.watch.available:
            try:
                return await self.remote.hit(item, *ids, cost=cost)
            except Exception as e:
                self._lost(e)
        return await self.local.hit(item, *ids, cost=cost)

    async def get_window_stats(self, item: limits.RateLimitItem, *ids: str) -> WindowStats:
        if self.watch.available:
            try:
                return await self.remote.get_window_stats(item, *ids)
            except Exception as e:
                self._lost(e)
        return await self.local.get_window_stats(item, *ids)

    async def close(self) -> None:
        await self.remote.close()


def open_windows(url: str, watch: StateWatch | None = None) -> Windows:
    """The windows for ``state.url``, chosen once: in memory, or on Redis (behind this
    instance's own windows for outages when ``watch`` follows Redis's health)."""
    if url.startswith("memory://"):
        return MemoryWindows()
    if url.startswith(("redis://", "rediss://")):
        remote = RedisWindows(url)
        return remote if watch is None else FailoverWindows(remote, watch)
    raise ValueError(f"unsupported state.url {url!r} (memory:// or redis://)")
