"""Money spent and reserved per account (a user, or a key) and calendar month (UTC).

Amounts are integers in billionths of a dollar ("nano-USD", the usage table's DECIMAL(18, 9)
scale), so sums are exact and Redis adds them with HINCRBY.

A request reserves its estimate at admission and settles at ``log``: the reservation is
replaced by what the request really cost (0 for a refused or failed one). A hard budget admits
a request only while ``spent + reserved + estimate <= budget``, so the month can pass the
budget only by what requests in flight turned out to cost beyond their estimates.

``MemoryLedger`` keeps it in process (the hot path touches a dict, no coroutine). Spent amounts
are written to ``state.dir/budgets.json`` once a second when they changed
(``proxy.shares.MonthlyCounts``, as the limits plugin keeps its monthly counts), so a restart
keeps the month's spending.

``RedisLedger`` shares it between instances (``state.url: redis://``): one hash per account,
``tollway:budget:ACCOUNT``, with two fields per month and instance (``2026-12/s/i-3f..``:
spent by that instance, ``2026-12/r/i-3f..``: its reservations in flight). A reservation is one
script (sum the month's fields, refuse or add the estimate), a settlement another. As for the
monthly quota, Redis holds a copy: each instance keeps its own spent share in its file and puts
it back when Redis comes back empty (``restore``: a share is raised to the file's, never
lowered; its reservation set to what is in flight here; repeated while amounts decided alone
changed meanwhile). A restarted instance zeroes its own reservation fields, so a crash leaves
none behind, and first raises its file's spent amounts to its own spent shares in Redis: the
file is written once a second, so after a crash Redis may hold the last second of spending the
file missed, which a later empty Redis would otherwise forget (with a ``state.dir``: the
instance keeps its name). While Redis is unreachable an instance decides alone (the others'
total as last seen, from its last settlement or refusal, plus its own), or refuses, per
``state.on_unavailable``: alone, the month can pass a budget by what the others spend while
cut off (``refuse``: never). A reservation refuses to decide on a Redis whose epoch is not the
one the watch last saw (``proxy.statewatch.epoch_guard``): emptied by a restart, it would
find the month unspent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from proxy.months import MonthCache as MonthCache  # re-exported: the plugin takes it from here
from proxy.shares import SHARE_TTL, MonthlyCounts, RedisShares
from proxy.statedir import instance_id
from proxy.statewatch import EpochChanged, StateWatch, epoch_guard, is_state_error

NANO = 1_000_000_000
"""Nano-USD per dollar."""

ADMITTED = -1


@dataclass(slots=True)
class Charge:
    """One account's part of a request: its hard limit (nano-USD; -1 = none: alerts only)
    and the request's estimate, reserved at admission."""

    account: str
    limit: int
    estimate: int


class Ledger(Protocol):
    """Spent and reserved amounts per (account, month), in memory or on Redis."""

    def reserve_now(self, month: str, charges: list[Charge]) -> tuple[int, int] | None:
        """Reserve every charge's estimate when each account stays within its limit:
        ``(ADMITTED, 0)``; else ``(index of the first account over, its spent + reserved)``,
        nothing reserved. None when only ``await reserve`` can decide (shared state)."""
        ...

    async def reserve(self, month: str, charges: list[Charge]) -> tuple[int, int]:
        """As ``reserve_now``, always decided."""
        ...

    def settle_now(self, month: str, charges: list[Charge], actuals: list[int]) -> list[int] | None:
        """As ``settle`` when it needs no await (in process); None: ``await settle``."""
        ...

    async def settle(self, month: str, charges: list[Charge], actuals: list[int]) -> list[int]:
        """Replace each reservation with the request's actual amount; the accounts' spent
        totals after it (of every instance, as far as known)."""
        ...

    async def status(self, account: str, month: str) -> tuple[int, int]:
        """Spent and reserved of the account in the month."""
        ...

    async def forget(self, accounts: list[str]) -> int:
        """Drop the accounts' amounts; how many months had one."""
        ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...


class MemoryLedger:
    """In process: spent per (account, month) persisted by ``MonthlyCounts``; reservations in
    memory only (they end with the process, and so do the requests they belong to)."""

    def __init__(self, path: Path | None) -> None:
        self.spent = MonthlyCounts(path)
        self.reserved: dict[tuple[str, str], int] = {}

    def total(self, account: str, month: str) -> int:
        return self.spent.used(account, month) + self.reserved.get((account, month), 0)

    def reserve_now(self, month: str, charges: list[Charge]) -> tuple[int, int]:
        for i, c in enumerate(charges):
            if c.limit >= 0:
                total = self.total(c.account, month)
                if total + c.estimate > c.limit:
                    return i, total
        self.hold(month, charges)
        return ADMITTED, 0

    def hold(self, month: str, charges: list[Charge]) -> None:
        """Add the reservations without a check (decided elsewhere)."""
        reserved = self.reserved
        for c in charges:
            k = (c.account, month)
            reserved[k] = reserved.get(k, 0) + c.estimate

    async def reserve(self, month: str, charges: list[Charge]) -> tuple[int, int]:
        return self.reserve_now(month, charges)

    def settle_now(self, month: str, charges: list[Charge], actuals: list[int]) -> list[int]:
        out = []
        reserved = self.reserved
        for c, actual in zip(charges, actuals, strict=True):
            k = (c.account, month)
            left = reserved.get(k, 0) - c.estimate
            if left > 0:
                reserved[k] = left
            else:
                reserved.pop(k, None)
            if actual:
                self.spent.add(c.account, month, actual)
            out.append(self.spent.used(c.account, month))
        return out

    async def settle(self, month: str, charges: list[Charge], actuals: list[int]) -> list[int]:
        return self.settle_now(month, charges, actuals)

    async def status(self, account: str, month: str) -> tuple[int, int]:
        return self.spent.used(account, month), self.reserved.get((account, month), 0)

    async def forget(self, accounts: list[str]) -> int:
        n = 0
        for account in accounts:
            n += await self.spent.forget(account)
            for k in [k for k in self.reserved if k[0] == account]:
                del self.reserved[k]
        return n

    async def open(self) -> None:
        self.spent.start()

    async def close(self) -> None:
        await self.spent.close()


# KEYS: the accounts' hashes. ARGV: month, instance, ttl, then per account: limit (-1: none),
# estimate, then the epoch (proxy.statewatch.epoch_guard). Returns {0, 0} with every estimate
# reserved, or {i, total}: account i (1-based) would pass its limit (spent + reserved of every
# instance), nothing reserved; {-1, 0}: Redis lost its data since the epoch, nothing decided.
_RESERVE = (
    epoch_guard("{-1, 0}")
    + """
local prefix = ARGV[1] .. '/'
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 + 2 * i])
  if limit >= 0 then
    local total = 0
    local f = redis.call('HGETALL', KEYS[i])
    for j = 1, #f, 2 do
      if string.sub(f[j], 1, #prefix) == prefix then total = total + tonumber(f[j + 1]) end
    end
    if total + tonumber(ARGV[3 + 2 * i]) > limit then return {i, total} end
  end
end
local field = prefix .. 'r/' .. ARGV[2]
for i = 1, #KEYS do
  redis.call('HINCRBY', KEYS[i], field, ARGV[3 + 2 * i])
  redis.call('EXPIRE', KEYS[i], ARGV[3])
end
return {0, 0}
"""
)

# KEYS: the accounts' hashes. ARGV: month, instance, ttl, then per account: estimate, actual.
# Returns each account's spent total of the month (every instance's share) after it.
_SETTLE = """
local prefix = ARGV[1] .. '/'
local spent_prefix = prefix .. 's/'
local out = {}
for i = 1, #KEYS do
  local r = redis.call('HINCRBY', KEYS[i], prefix .. 'r/' .. ARGV[2], -tonumber(ARGV[2 + 2 * i]))
  if r < 0 then redis.call('HSET', KEYS[i], prefix .. 'r/' .. ARGV[2], 0) end
  redis.call('HINCRBY', KEYS[i], spent_prefix .. ARGV[2], ARGV[3 + 2 * i])
  redis.call('EXPIRE', KEYS[i], ARGV[3])
  local total = 0
  local f = redis.call('HGETALL', KEYS[i])
  for j = 1, #f, 2 do
    if string.sub(f[j], 1, #spent_prefix) == spent_prefix then total = total + tonumber(f[j + 1]) end
  end
  out[i] = total
end
return out
"""

# KEYS[1]: an account's hash. ARGV: spent field, own spent, reserved field, own reserved, ttl.
# Nothing in flight here: no reservation field (what a crashed process left is dropped too).
_RESTORE = """
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
if tonumber(ARGV[4]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
else
  redis.call('HDEL', KEYS[1], ARGV[3])
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
"""


class RedisLedger(RedisShares[MemoryLedger]):
    """Shared by instances on Redis; this instance's shares kept in ``own`` (see the module
    docstring)."""

    SHARE_INFIX = "/s/"  # the spent share is the durable one (reservations end with a process)

    def __init__(
        self,
        url: str,
        own: MemoryLedger,
        instance: str,
        watch: StateWatch | None,
        prefix: str = "tollway:budget:",
    ) -> None:
        super().__init__(url, own, instance, watch, prefix)  # _others: spent + reserved
        self._reserve = self.client.register_script(_RESERVE)
        self._settle = self.client.register_script(_SETTLE)
        self._restore = self.client.register_script(_RESTORE)

    def _counts(self) -> MonthlyCounts:
        return self.own.spent

    def _args(self, month: str) -> list[Any]:
        return [month, self.instance, SHARE_TTL]

    def reserve_now(self, month: str, charges: list[Charge]) -> tuple[int, int] | None:
        return None if self._shared() else self._reserve_alone(month, charges)

    def _reserve_alone(self, month: str, charges: list[Charge]) -> tuple[int, int]:
        for i, c in enumerate(charges):
            if c.limit >= 0:
                total = self._others.get((c.account, month), 0) + self.own.total(c.account, month)
                if total + c.estimate > c.limit:
                    return i, total
        self.own.hold(month, charges)
        self._changes += 1
        return ADMITTED, 0

    async def reserve(self, month: str, charges: list[Charge]) -> tuple[int, int]:
        if self._shared():
            args = self._args(month)
            for c in charges:
                args += [c.limit, c.estimate]
            epoch = None if self.watch is None else self.watch.epoch
            args.append(epoch or b"")
            try:
                index, total = await self._reserve(
                    keys=[self.prefix + c.account for c in charges], args=args
                )
                if index == -1 and epoch:  # emptied by a restart the watch has not seen yet
                    raise EpochChanged(epoch)
            except Exception as e:
                self._lost(e)
            else:
                if index:
                    c = charges[index - 1]
                    self._others[(c.account, month)] = int(total) - self.own.total(c.account, month)
                    return index - 1, int(total)
                self.own.hold(month, charges)
                return ADMITTED, 0
        return self._reserve_alone(month, charges)

    def settle_now(self, month: str, charges: list[Charge], actuals: list[int]) -> None:
        """Never: the shared amounts are settled by a script (``settle``)."""
        return None

    async def settle(self, month: str, charges: list[Charge], actuals: list[int]) -> list[int]:
        own = self.own.settle_now(month, charges, actuals)
        if self._shared():
            args = self._args(month)
            for c, actual in zip(charges, actuals, strict=True):
                args += [c.estimate, actual]
            try:
                totals = await self._settle(
                    keys=[self.prefix + c.account for c in charges], args=args
                )
            except Exception as e:
                self._lost(e)  # the watch puts the shares back once Redis is there again
            else:
                out = [int(t) for t in totals]
                # the others' spending as last seen: what deciding alone starts from, should
                # Redis become unreachable (without it, only refusals would tell)
                others = self._others
                for c, t, n in zip(charges, out, own, strict=True):
                    others[(c.account, month)] = max(0, t - n)
                return out
        self._changes += 1
        return [
            self._others.get((c.account, month), 0) + n for c, n in zip(charges, own, strict=True)
        ]

    async def status(self, account: str, month: str) -> tuple[int, int]:
        if self._shared():
            try:
                fields = await self.client.hgetall(self.prefix + account)
            except Exception as e:
                self._lost(e)
            else:
                spent = reserved = 0
                for f, v in fields.items():
                    parts = f.decode().split("/")
                    if len(parts) == 3 and parts[0] == month:
                        if parts[1] == "s":
                            spent += int(v)
                        else:
                            reserved += int(v)
                return spent, reserved
        spent, reserved = await self.own.status(account, month)
        return self._others.get((account, month), 0) + spent, reserved

    async def forget(self, accounts: list[str]) -> int:
        n = 0
        for account in accounts:
            n = max(n, await self._drop(account))
        return max(n, await self.own.forget(accounts))

    async def _put_back(self, counts: dict[str, dict[str, int]]) -> None:
        """Spent raised to this instance's own, reservations set to what is in flight here."""
        keys = {(a, m) for m, accounts in counts.items() for a in accounts}
        keys |= set(self.own.reserved)
        if not keys:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for account, month in keys:
                await self._restore(
                    keys=[self.prefix + account],
                    args=[
                        self._field(month),
                        counts.get(month, {}).get(account, 0),
                        f"{month}/r/{self.instance}",
                        self.own.reserved.get((account, month), 0),
                        SHARE_TTL,
                    ],
                    client=pipe,
                )
            await pipe.execute()

    async def _drop_stale_reservations(self) -> None:
        """At start: this instance has nothing in flight, so a reservation field of its name
        is what a crashed process left behind."""
        suffix = ("/r/" + self.instance).encode()
        async for key in self.client.scan_iter(match=self.prefix + "*", count=1000):
            try:
                fields = await self.client.hkeys(key)
            except Exception as e:
                if is_state_error(e):
                    raise
                continue  # not a hash
            stale = [f for f in fields if f.endswith(suffix)]
            if stale:
                await self.client.hdel(key, *stale)

    async def _seed(self) -> None:
        await self._drop_stale_reservations()
        await self.restore()


def open_ledger(
    redis_url: str | None, path: Path | None, folder: Path | None, watch: StateWatch | None
) -> Ledger:
    """The ledger for ``state``: in process (spent kept in ``path``), or shared on
    ``redis_url`` with that file as this instance's record (its name kept in ``folder``)."""
    own = MemoryLedger(path)
    if redis_url is None:
        return own
    ledger = RedisLedger(redis_url, own, instance_id(folder), watch)
    if watch is not None:
        watch.on_recover(ledger.restore)
    return ledger
