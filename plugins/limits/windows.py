"""Rate-limit windows: exact moving-window logs and sliding-window counters, in process or on Redis.

Each speaks one interface, ``Windows``: the ``limits`` strategy calls (``test``, ``hit``,
``get_window_stats``) for one window, and ``admit`` for all of a request's layers at once.
``open_windows`` picks the implementation when the plugin starts, so the plugin never asks which
one runs. ``admit_now`` lets the in-process counter decide in one synchronous pass (no coroutine
on the hot path); a store that must ask Redis answers None there and decides in ``admit``.

Two algorithms, chosen per layer by its limit (``exact_up_to``, a limits config key):

- a limit of up to ``exact_up_to`` requests is a moving-window log: the timestamps of the last
  admissions, at most ``limit`` of them, oldest dropped as they leave the period. It never admits
  more than ``limit`` in any interval of one period, and the wait it reports is when the oldest
  of them leaves (never longer than the period). A plan's "5 per minute" means exactly that.
- a larger limit (10,000/day) is a sliding-window counter (the previous fixed window's count,
  weighted by how much of it still overlaps the sliding window, plus the current window's count):
  O(1) time and two integers per key, where a log would keep 10,000 timestamps per user. It
  assumes the previous window's requests were spread evenly, so it can admit more than the limit
  in some interval of one period: never more than the limit within one fixed window, so at most
  twice the limit in an interval that straddles two (the previous window filled in its last
  instant, the current one at its start); its wait can reach two periods.

Token budgets (``test``/``hit``/``get_window_stats`` with a cost) always use the counter.

On Redis (``RedisWindows.admit``) the same two algorithms run in one server-side script for all
of a request's layers and its monthly quota: one round trip that checks every one, counts the
request only if all admit it, and returns the numbers for the rate-limit headers. The times are
the Redis server's clock, one for every instance.

Both keep time as whole microseconds (``micros``), not seconds, so that they decide alike, to
the microsecond: an arrival exactly one period after an admission finds it gone (the window is
(now - period, now]). In float seconds ``now - period`` is rounded and can land just below the
earlier stamp (60.476 - 60 < 0.476), refusing with a wait of 0; whole numbers subtract exactly.
They are held in floats (exact below 2**53 µs, the year 2255), here and in the script's Lua
numbers: float arithmetic costs the hot path less than Python's multi-digit ints. Waits are
rounded up to the microsecond in both.

Why not the library's own in-memory storage: measured here, its async MemoryStorage re-arms an
expiry task that hops to a thread per key on nearly every call, and its per-call cost was
~6-13 µs; this class costs about 1 µs a call and never leaves the event loop.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from proxy.redisurl import redis_url, timeouts
from proxy.statewatch import EpochChanged, StateWatch, is_state_error

if TYPE_CHECKING:
    # the library is imported where Redis windows are built: importing ``limits`` loads its
    # every storage (~50 ms), which a memory-only gateway and ``tollway --help`` do not need
    import limits


MICROS = 1_000_000


def micros(seconds: float) -> float:
    """A time or period in whole microseconds (a float with no fraction): the windows' one
    time base, here and in the Redis script. One rounding for both (half up), so both compare
    the same numbers; ``MemoryWindows.admit_now`` inlines it."""
    return (seconds * MICROS + 0.5) // 1.0


class WindowStats(NamedTuple):
    reset_time: float  # UNIX time at which one more request would pass
    remaining: int


class Admit(NamedTuple):
    """Outcome of checking several layers at once.

    ``failed`` is the index of the layer that refused (-1 if admitted, ``QUOTA_REFUSED``,
    ``UNDECIDED``); ``layer`` names the layer the numbers describe: the refusing one, or the
    most constraining after the hit. ``quota`` is the month's total with this request when a
    quota was taken in the same step (``Windows.admit(bound, quota)``), else -1.
    """

    failed: int
    layer: int
    remaining: int
    wait: float  # seconds until one more request fits in that layer
    quota: int = -1


QUOTA_REFUSED = -2
"""``Admit.failed`` when the monthly quota given to ``admit`` refused (nothing counted)."""
UNDECIDED = -3
EPOCH_CHANGED = -4
"""The admission script's answer when the epoch is not the one given (nothing counted)."""
"""``Admit.failed`` when the windows could not take the quota given to ``admit`` (nothing
counted): the caller takes the quota itself, then admits without it."""

QuotaPart = tuple[str, list[str]]
"""A shared monthly quota taken with the layers: the user's hash and the script's quota
arguments (``RedisQuota.script_part``)."""


Layer = tuple[int, float, tuple[str, ...]]
"""(limit, period in seconds, identifiers such as ("user", "alice"))."""

EXACT_UP_TO = 1000
"""Limits of up to this many requests per period are kept as exact logs (the config default)."""


class BoundLayers:
    """A caller's layers and, once ``MemoryWindows.admit_now`` has seen them, their counters.

    A caller's next request then goes straight to its counters instead of building a key and
    looking it up per layer (the largest part of admission). The counters stay valid until the
    windows sweep stale keys (``MemoryWindows.generation``), which would orphan a removed one.
    """

    __slots__ = ("counters", "generation", "groups", "layers", "logs", "remote")

    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers
        # the exact layers: [(limit, period µs, log of admission times in µs, layer index), ...]
        self.logs: list[tuple[int, float, deque[float], int]] = []
        # the counted layers grouped by period: [(period µs, [(limit, counter, index)]), ...]
        self.groups: list[tuple[float, list[tuple[int, list[float], int]]]] = []
        self.counters: list[list[float]] = []  # one per counted layer
        self.generation = -1
        self.remote: RemoteLayers | None = None  # RedisWindows' packed keys and arguments


_ADMIT_EMPTY = Admit(-1, -1, 0, 0.0)
_UNDECIDED = Admit(UNDECIDED, -1, 0, 0.0)


class Windows(Protocol):
    """Rate-limit windows, wherever they are kept: what the limits plugin asks."""

    def admit_now(self, bound: BoundLayers) -> Admit | None:
        """Check every layer and count the request in all of them only if all admit it, when
        that can be decided without awaiting; None when it needs the shared store: then
        ``await admit(bound)``. Synchronous so the in-process windows cost no coroutine."""
        ...

    async def admit(self, bound: BoundLayers, quota: QuotaPart | None = None) -> Admit:
        """As ``admit_now``, always decided; with ``quota``, the monthly quota is taken in the
        same step, and only if every layer admits (``QUOTA_REFUSED``; ``UNDECIDED`` if these
        windows cannot)."""
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
    """Sliding-window counters in a dict: ``{key: [window_index, previous, current]}``, and
    exact logs: ``{key: deque of admission times}``, every time in whole µs (``micros``)."""

    SWEEP_EVERY = 50_000

    def __init__(
        self, clock: Callable[[], float] = time.time, exact_up_to: int = EXACT_UP_TO
    ) -> None:
        self.clock = clock
        self.exact_up_to = exact_up_to
        self._counts: dict[tuple[object, ...], list[float]] = {}
        self._logs: dict[tuple[object, ...], deque[float]] = {}
        self._ops = 0
        self.generation = 0  # bumped by a sweep: every BoundLayers must look its counters up again

    def _state(
        self, item: limits.RateLimitItem, ids: tuple[str, ...], now: float
    ) -> tuple[list[float], float, float]:
        return self._state_at(item.amount, float(item.get_expiry()), ids, now)

    def _state_at(
        self, amount: int, period: float, ids: tuple[str, ...], now: float
    ) -> tuple[list[float], float, float]:
        """A counter rolled forward to ``now`` (µs), its period and the time elapsed in its
        current window (both µs)."""
        span = micros(period)
        index = now // span
        key = (amount, period, ids)
        st = self._counts.get(key)
        if st is None:
            st = self._counts[key] = [index, 0, 0]
            self._ops += 1
            if self._ops >= self.SWEEP_EVERY:
                self._sweep(now)
        elif st[0] != index:
            self._roll(st, index)
        return st, span, now - index * span

    @staticmethod
    def _roll(st: list[float], index: float) -> None:
        """Roll a counter forward to window ``index``: the current window becomes the previous
        one (or both expire). ``admit_now`` inlines these three lines on its hot path."""
        st[1] = st[2] if st[0] == index - 1 else 0
        st[2] = 0
        st[0] = index

    def _log_at(self, amount: int, period: float, ids: tuple[str, ...], now: float) -> deque[float]:
        key = (amount, period, ids)
        log = self._logs.get(key)
        if log is None:
            self._ops += 1
            if self._ops >= self.SWEEP_EVERY:
                self._sweep(now)  # first: a new, empty log would be swept at once
            log = self._logs[key] = deque()
        return log

    def _resolve(self, bound: BoundLayers, now: float) -> None:
        generation = -1
        while generation != self.generation:  # again if a sweep ran while looking them up
            generation = self.generation
            self._resolve_once(bound, now)

    def _resolve_once(self, bound: BoundLayers, now: float) -> None:
        groups: dict[float, list[tuple[int, list[float], int]]] = {}
        counters = []
        logs = []
        for i, (amount, period, ids) in enumerate(bound.layers):
            if amount <= self.exact_up_to:
                logs.append((amount, micros(period), self._log_at(amount, period, ids, now), i))
                continue
            st = self._state_at(amount, period, ids, now)[0]
            groups.setdefault(micros(period), []).append((amount, st, i))
            counters.append(st)
        bound.logs = logs
        bound.groups = list(groups.items())
        bound.counters = counters
        bound.generation = self.generation

    async def admit(self, bound: BoundLayers, quota: QuotaPart | None = None) -> Admit:
        return _UNDECIDED if quota is not None else self.admit_now(bound)

    async def close(self) -> None:
        """Nothing to release: the counters are plain memory."""

    def admit_now(self, bound: BoundLayers, cost: int = 1) -> Admit:
        """Check every layer, then count the request in all of them, in one synchronous pass:
        nothing is consumed unless every layer admits it, and no other request can interleave
        (the event loop does not switch inside). Always decided (``Windows.admit_now``).
        The arithmetic is the Redis script's, in the same order, so both decide alike."""
        now = (self.clock() * MICROS + 0.5) // 1.0  # micros(), inlined
        if bound.generation != self.generation:
            self._resolve(bound, now)
        best, best_left = -1, math.inf
        # the admitting layer's counter (None: an exact log), period and time into its window,
        # kept as found: its reset needs no key built and looked up again
        best_st: list[float] | None = None
        best_span = best_elapsed = 0.0
        for amount, period, log, i in bound.logs:
            cutoff = now - period  # drop the admissions that left the period: amortised O(1)
            while log and log[0] <= cutoff:
                log.popleft()
            left: float = amount - len(log) - cost
            if left < best_left:
                if left < 0:
                    return self._refuse(bound, now, cost)
                best, best_left, best_span = i, left, period
        for period, members in bound.groups:  # layers of one period share their window maths
            index = now // period
            elapsed = now - index * period
            weight = 1 - elapsed / period  # of the previous window's count
            for amount, st, i in members:
                if st[0] != index:  # _roll, inlined: this runs per layer per request
                    st[1] = st[2] if st[0] == index - 1 else 0
                    st[2] = 0
                    st[0] = index
                left = amount - (st[1] * weight + st[2]) - cost
                if left < best_left:
                    if left < 0:
                        return self._refuse(bound, now, cost)
                    best, best_left, best_st, best_span, best_elapsed = (
                        i,
                        left,
                        st,
                        period,
                        elapsed,
                    )
        if best < 0:
            return _ADMIT_EMPTY
        if cost == 1:
            for _, _, log, _ in bound.logs:
                log.append(now)
        else:
            for _, _, log, _ in bound.logs:
                log.extend([now] * cost)
        for st in bound.counters:
            st[2] += cost
        if best_st is None:
            wait = best_span  # the whole log is free again once this request leaves it
        else:
            wait = self._full_reset(best_st, best_span, best_elapsed)
        return Admit(-1, best, math.floor(best_left), wait / MICROS)

    def _refuse(self, bound: BoundLayers, now: float, cost: int) -> Admit:
        """The refusal, naming the full layer that frees up last: a request fits only once
        every layer admits it, so that layer's wait is the honest Retry-After (the first
        full layer found could free up sooner and send the client into another 429)."""
        worst, worst_wait = -1, -1.0
        for amount, period, log, i in bound.logs:
            cutoff = now - period  # (dropping what left the period changes no count)
            while log and log[0] <= cutoff:
                log.popleft()
            over = len(log) + cost - amount  # admissions that must leave first
            if over > 0:
                wait = log[over - 1] + period - now if cost <= amount else period
                if wait > worst_wait:
                    worst, worst_wait = i, wait
        for period, members in bound.groups:
            index = now // period
            elapsed = now - index * period
            for amount, st, i in members:
                if st[0] != index:  # not yet rolled forward if the pass stopped before it
                    self._roll(st, index)
                if amount - self._weighted(st, period, elapsed) - cost < 0:
                    wait = self._wait(st, amount, period, elapsed)
                    if wait > worst_wait:
                        worst, worst_wait = i, wait
        return Admit(worst, worst, 0, worst_wait / MICROS)

    @staticmethod
    def _full_reset(st: list[float], period: float, elapsed: float) -> float:
        """Microseconds until the layer is back to its whole limit (OpenAI's reset header)."""
        if st[2] > 0:
            return 2 * period - elapsed
        if st[1] > 0:
            return period - elapsed
        return 0

    @staticmethod
    def _weighted(st: list[float], period: float, elapsed: float) -> float:
        return st[1] * (1 - elapsed / period) + st[2]

    async def test(self, item: limits.RateLimitItem, *ids: str, cost: int = 1) -> bool:
        st, period, elapsed = self._state(item, ids, micros(self.clock()))
        return item.amount - self._weighted(st, period, elapsed) - cost >= 0

    async def hit(self, item: limits.RateLimitItem, *ids: str, cost: int = 1) -> bool:
        st, period, elapsed = self._state(item, ids, micros(self.clock()))
        if item.amount - self._weighted(st, period, elapsed) - cost < 0:
            return False
        st[2] += cost
        return True

    async def get_window_stats(self, item: limits.RateLimitItem, *ids: str) -> WindowStats:
        now = micros(self.clock())
        st, period, elapsed = self._state(item, ids, now)
        weighted = self._weighted(st, period, elapsed)
        remaining = max(0, math.floor(item.amount - weighted))
        if item.amount - weighted - 1 >= 0:
            return WindowStats(now / MICROS, remaining)
        return WindowStats((now + self._wait(st, item.amount, period, elapsed)) / MICROS, remaining)

    @staticmethod
    def _wait(st: list[float], limit: int, period: float, elapsed: float) -> float:
        """Microseconds (rounded up) until one more request fits in a full counter; the
        script's formula, step for step."""
        prev, cur = st[1], st[2]
        if cur + 1 <= limit and prev > 0:
            # within this window, as the previous window's weight decays
            return math.ceil(max(0, period * (1 - (limit - 1 - cur) / prev) - elapsed))
        # next window: this window's count becomes the decaying previous one
        if cur <= 0:
            return period - elapsed
        return math.ceil(period - elapsed + max(0, period * (1 - (limit - 1) / cur)))

    def _sweep(self, now: float) -> None:
        """Drop counters whose windows have both expired (keeps memory bounded by live keys)."""
        self._ops = 0
        self.generation += 1
        stale = [
            k
            for k, st in self._counts.items()
            if now // micros(k[1]) > st[0] + 1  # type: ignore[arg-type]
        ]
        for k in stale:
            del self._counts[k]
        gone = [
            k
            for k, log in self._logs.items()
            if not log or log[-1] <= now - micros(k[1])  # type: ignore[arg-type]
        ]
        for k in gone:
            del self._logs[k]

    def used(self, layer: Layer) -> float:
        """How much of ``layer`` is taken now: admissions in its log, or its weighted count
        (nothing changed; tests compare it before and after refusals)."""
        amount, period, ids = layer
        now, span = micros(self.clock()), micros(period)
        key = (amount, period, ids)
        if amount <= self.exact_up_to:
            return float(sum(1 for t in self._logs.get(key, ()) if t > now - span))
        st = self._counts.get(key)
        if st is None:
            return 0.0
        index = now // span
        prev = st[2] if st[0] == index - 1 else st[1] if st[0] == index else 0
        cur = st[2] if st[0] == index else 0
        return prev * (1 - (now - index * span) / span) + cur

    def __len__(self) -> int:
        return len(self._counts) + len(self._logs)


_ADMIT_SCRIPT = """
-- All of one request's layers (and its monthly quota), checked and counted together: the
-- request counts in every one only if every one admits it. KEYS[i]: layer i's key, then the
-- quota's hash if there is one. ARGV[1]: now in integer microseconds ('' = the server's clock,
-- which every instance then shares); ARGV[2..5]: the quota's field, month, limit and ttl (all
-- '' without one; counted as quota.py's _TAKE does); then per layer: limit, period in integer
-- microseconds, kind (1: a log of admission times in microseconds, newest first; 0: a
-- sliding-window counter, one key per fixed window, KEYS[i]..':'..index). Every time is an
-- integer (exact in a double below 2^53), so now - period is exact: an arrival one period
-- after an admission finds it gone, as in MemoryWindows, whose arithmetic this mirrors step
-- for step. Returns {failed, layer, remaining, wait, quota total}: failed is the 0-based
-- index of the refusing layer that frees up last, -1 admitted, -2 the quota refused; layer
-- names the numbers' layer (that one, or the most constraining after the count, -1 none);
-- wait is whole microseconds, rounded up; the quota total counts this request (-1 no quota).
-- The last ARGV is the epoch (proxy.statewatch) the instance knows ('' = none): a different or
-- missing sentinel means Redis lost its data since, so nothing is decided on what it holds
-- now: {-4, ...} (one GET, before any write; the key is fixed, so not among KEYS).
local epoch = ARGV[#ARGV]
if epoch ~= '' and redis.call('GET', 'tollway:epoch') ~= epoch then return {-4, -1, 0, 0, -1} end
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local n = #KEYS
local qtotal = -1
if ARGV[2] ~= '' then
  local qkey, month = KEYS[n], ARGV[3]
  local prefix = month .. '/'
  n = n - 1
  qtotal = 1
  local fields = redis.call('HGETALL', qkey)
  for i = 1, #fields, 2 do
    local f = fields[i]
    if f == month or string.sub(f, 1, #prefix) == prefix then
      qtotal = qtotal + tonumber(fields[i + 1])
    end
  end
  if qtotal > tonumber(ARGV[4]) then return {-2, -1, 0, 0, qtotal - 1} end
end
local used, cur_keys = {}, {}
local worst, worst_wait = -1, -1
for i = 1, n do
  local limit, period = tonumber(ARGV[3 * i + 3]), tonumber(ARGV[3 * i + 4])
  local key = KEYS[i]
  if ARGV[3 * i + 5] == '1' then
    local cutoff = now - period
    while true do  -- drop the admissions that left the period (changes no count)
      local oldest = redis.call('LINDEX', key, -1)
      if not oldest or tonumber(oldest) > cutoff then break end
      redis.call('RPOP', key)
    end
    local len = redis.call('LLEN', key)
    used[i] = len
    if len + 1 > limit then  -- the (len + 1 - limit)-th oldest must leave first
      local wait = tonumber(redis.call('LINDEX', key, limit - 1)) + period - now
      if wait > worst_wait then worst, worst_wait = i, wait end
    end
  else
    local index = math.floor(now / period)
    if index * period > now then index = index - 1 end  -- the quotient rounded up: floor it
    local elapsed = now - index * period
    local ck = key .. ':' .. string.format('%.0f', index)
    local cur = tonumber(redis.call('GET', ck) or '0')
    local prev = tonumber(redis.call('GET', key .. ':' .. string.format('%.0f', index - 1)) or '0')
    local weighted = prev * (1 - elapsed / period) + cur
    used[i], cur_keys[i] = weighted, ck
    if limit - weighted - 1 < 0 then
      local wait
      if cur + 1 <= limit and prev > 0 then
        wait = math.ceil(math.max(0, period * (1 - (limit - 1 - cur) / prev) - elapsed))
      elseif cur <= 0 then
        wait = period - elapsed
      else
        wait = math.ceil(period - elapsed + math.max(0, period * (1 - (limit - 1) / cur)))
      end
      if wait > worst_wait then worst, worst_wait = i, wait end
    end
  end
end
if worst > 0 then
  return {worst - 1, worst - 1, 0, worst_wait, -1}
end
if qtotal > 0 then
  redis.call('HINCRBY', KEYS[n + 1], ARGV[2], 1)
  redis.call('EXPIRE', KEYS[n + 1], ARGV[5])
end
local stamp = string.format('%.0f', now)
local best, best_left, best_wait = 0, 0, 0
for i = 1, n do
  local limit, period = tonumber(ARGV[3 * i + 3]), tonumber(ARGV[3 * i + 4])
  local left, wait
  if ARGV[3 * i + 5] == '1' then
    redis.call('LPUSH', KEYS[i], stamp)
    redis.call('PEXPIRE', KEYS[i], math.ceil(period / 1000))
    left, wait = limit - used[i] - 1, period
  else
    redis.call('INCR', cur_keys[i])
    redis.call('EXPIRE', cur_keys[i], math.ceil(2 * period / 1000000) + 1)
    local index = math.floor(now / period)
    if index * period > now then index = index - 1 end
    left, wait = limit - used[i] - 1, 2 * period - (now - index * period)
  end
  if best == 0 or left < best_left then best, best_left, best_wait = i, left, wait end
end
return {-1, best - 1, math.floor(best_left), best_wait, qtotal}
"""


class RemoteLayers(NamedTuple):
    """A caller's layers as ``_ADMIT_SCRIPT``'s keys and arguments, packed once per caller
    (RESP bulk strings, ``proxy.resp.bulk``), and its whole usual command: no quota, the
    server's clock."""

    n_keys: int
    keys: bytes
    n_args: int
    args: bytes  # the per-layer arguments (after ARGV[1..5]), then the epoch
    plain: bytes
    epoch: bytes | None  # the watch's epoch the arguments end with


_NO_NOW_NO_QUOTA = b"$0\r\n\r\n" * 5  # ARGV[1..5], empty: the server's clock, no quota


class RedisWindows:
    """The windows on Redis, shared by every instance. ``admit`` (every request) is one script
    call for all layers (``_ADMIT_SCRIPT``: EVALSHA, loaded again on NOSCRIPT) on a lean
    pipelined connection (``proxy.resp.RespLink``: redis-py's asyncio client cost ~50-70 µs
    of CPU a call, more than the rest of the plugin); the token budgets'
    ``test``/``hit``/``get_window_stats`` use the ``limits`` library's sliding-window counter
    (redis-py, loaded only when this is built)."""

    def __init__(
        self,
        url: str,
        exact_up_to: int = EXACT_UP_TO,
        clock: Callable[[], float] | None = None,
    ) -> None:
        from limits.aio.strategies import SlidingWindowCounterRateLimiter
        from limits.storage import storage_from_string

        from proxy.resp import RespLink, Script, bulk  # loads redis-py and hiredis

        self._storage: Any = storage_from_string(
            f"async+{redis_url(url)}", implementation="redispy", **timeouts(url)
        )
        self.limiter = SlidingWindowCounterRateLimiter(self._storage)
        self.exact_up_to = exact_up_to
        self.clock = clock  # None: the Redis server's clock (one clock for every instance)
        self.link = RespLink(url)
        self.script = Script(_ADMIT_SCRIPT)
        self._bulk = bulk
        # set by FailoverWindows: the script refuses to decide on a Redis whose epoch is not
        # the one this watch last saw (emptied by a restart its check has not noticed yet)
        self.watch: StateWatch | None = None

    def admit_now(self, bound: BoundLayers) -> None:
        """Never decided without Redis: see ``admit``."""
        return None

    def _remote(self, bound: BoundLayers, epoch: bytes | None) -> RemoteLayers:
        """The script's keys and per-layer arguments for a caller, built and packed once per
        caller (and again when the epoch changes), with the whole usual command: nothing is
        encoded per request."""
        keys: list[bytes] = []
        args: list[bytes] = []
        for amount, period, ids in bound.layers:
            exact = amount <= self.exact_up_to
            kind = "log" if exact else "cnt"  # in the key: two configs never share one key
            keys.append(f"tollway:rl:{kind}:{amount}/{period:g}:{':'.join(ids)}".encode())
            span = str(int(micros(period))).encode()
            args += (str(amount).encode(), span, b"1" if exact else b"0")
        args.append(epoch or b"")
        bulk = self._bulk
        packed_keys, packed_args = b"".join(map(bulk, keys)), b"".join(map(bulk, args))
        plain = packed_keys + _NO_NOW_NO_QUOTA + packed_args
        bound.remote = RemoteLayers(
            len(keys),
            packed_keys,
            len(args),
            packed_args,
            self.script.command(len(keys), 5 + len(args), plain),
            epoch,
        )
        return bound.remote

    async def admit(self, bound: BoundLayers, quota: QuotaPart | None = None) -> Admit:
        """All layers (and the quota) in one round trip: checked, then counted only if every
        one admits. ``EpochChanged`` when Redis lost its data since the watch last checked."""
        watch = self.watch
        epoch = None if watch is None else watch.epoch
        remote = bound.remote
        if remote is None or remote.epoch is not epoch:
            remote = self._remote(bound, epoch)
        if quota is None and self.clock is None:
            command = remote.plain  # the usual call, packed once per caller
        else:
            bulk = self._bulk
            now = b"" if self.clock is None else str(int(micros(self.clock()))).encode()
            keys, n_keys = remote.keys, remote.n_keys
            extra = [now, b"", b"", b"", b""]
            if quota is not None:
                keys, n_keys = keys + bulk(quota[0].encode()), n_keys + 1
                extra = [now, *(a.encode() for a in quota[1])]
            packed = keys + b"".join(map(bulk, extra)) + remote.args
            command = self.script.command(n_keys, len(extra) + remote.n_args, packed)
        res = await self.link.evalsha(self.script, command)
        failed, layer, remaining, wait, total = res
        if failed == EPOCH_CHANGED and epoch:
            raise EpochChanged(epoch)
        return Admit(int(failed), int(layer), int(remaining), int(wait) / MICROS, int(total))

    async def test(self, item: limits.RateLimitItem, *ids: str, cost: int = 1) -> bool:
        return await self.limiter.test(item, *ids, cost=cost)

    async def hit(self, item: limits.RateLimitItem, *ids: str, cost: int = 1) -> bool:
        return await self.limiter.hit(item, *ids, cost=cost)

    async def get_window_stats(self, item: limits.RateLimitItem, *ids: str) -> WindowStats:
        stats = await self.limiter.get_window_stats(item, *ids)
        return WindowStats(stats.reset_time, stats.remaining)

    async def close(self) -> None:
        """Close the admission connection and the ``limits`` library's redis-py pool."""
        await self.link.close()
        await self._storage.bridge.storage.aclose()


class FailoverWindows:
    """The shared windows on Redis, or this instance's own (``MemoryWindows``) while the shared
    state is unreachable: each instance then enforces every limit alone (a deployment of N
    instances admits up to N times a limit for the outage) instead of failing requests. Whether
    a request may be served that way at all is the limits plugin's decision
    (``state.on_unavailable``). Rate windows are not restored after an outage: they are at most
    one period long, and the shared ones resume where Redis left them (or empty)."""

    def __init__(self, remote: Windows, watch: StateWatch, exact_up_to: int = EXACT_UP_TO) -> None:
        self.remote = remote
        self.local = MemoryWindows(exact_up_to=exact_up_to)
        self.watch = watch
        if isinstance(remote, RedisWindows):
            remote.watch = watch

    def _lost(self, exc: Exception) -> None:
        if not is_state_error(exc):
            raise exc
        self.watch.failed(exc)

    def admit_now(self, bound: BoundLayers) -> Admit | None:
        """Decided here while Redis is unreachable (this instance alone); else None."""
        return None if self.watch.available else self.local.admit_now(bound)

    async def admit(self, bound: BoundLayers, quota: QuotaPart | None = None) -> Admit:
        if self.watch.available:
            try:
                return await self.remote.admit(bound, quota)
            except Exception as e:
                self._lost(e)
        # decided alone: the quota is the caller's to take first (nothing counted here)
        return _UNDECIDED if quota is not None else self.local.admit_now(bound)

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


def open_windows(
    url: str, watch: StateWatch | None = None, exact_up_to: int = EXACT_UP_TO
) -> Windows:
    """The windows for ``state.url``, chosen once: in memory, or on Redis (behind this
    instance's own windows for outages when ``watch`` follows Redis's health). Limits of up
    to ``exact_up_to`` requests are exact logs, larger ones sliding-window counters."""
    if url.startswith("memory://"):
        return MemoryWindows(exact_up_to=exact_up_to)
    if url.startswith(("redis://", "rediss://")):
        remote = RedisWindows(url, exact_up_to)
        return remote if watch is None else FailoverWindows(remote, watch, exact_up_to)
    raise ValueError(f"unsupported state.url {url!r} (memory:// or redis://)")
