"""Money spent and reserved per account (a user, or a key) and calendar month (UTC).

Amounts are integers in billionths of a dollar ("nano-USD", the usage table's DECIMAL(18, 9)
scale), so sums are exact and Redis adds them with HINCRBY.

A request reserves its estimate at admission and settles at ``log``: the reservation is
replaced by what the request really cost (0 for a refused or failed one). A hard budget admits
a request only while ``spent + reserved + estimate <= budget``, so the month can pass the
budget only by what requests in flight turned out to cost beyond their estimates.

``MemoryLedger`` keeps it in process (the hot path touches a dict, no coroutine). Spent amounts
are written to ``state.dir/budgets.json`` once a second when they changed (as the limits
plugin keeps its monthly counts), so a restart keeps the month's spending.

``RedisLedger`` shares it between instances (``state.url: redis://``): one hash per account,
``tollway:budget:ACCOUNT``, with two fields per month and instance (``2026-12/s/i-3f..``:
spent by that instance, ``2026-12/r/i-3f..``: its reservations in flight). A reservation is one
script (sum the month's fields, refuse or add the estimate), a settlement another. As for the
monthly quota, Redis holds a copy: each instance keeps its own spent share in its file and puts
it back when Redis comes back empty (``restore``: a share is raised to the file's, never
lowered; its reservation set to what is in flight here). A restarted instance zeroes its own
reservation fields, so a crash leaves none behind (with a ``state.dir``: the instance keeps its
name). While Redis is unreachable an instance decides alone (the others' total as last seen
plus its own), or refuses, per ``state.on_unavailable``.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson

from proxy.statewatch import StateWatch, is_state_error

TTL = 62 * 86400
"""Seconds an account's Redis amounts outlive their last change (this month's and the last)."""

NANO = 1_000_000_000
"""Nano-USD per dollar."""

ADMITTED = -1


def month_of(ts: float) -> str:
    """``YYYY-MM`` of a UNIX time, in UTC."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m")


def next_month_start(ts: float) -> float:
    """UNIX time of the next calendar month's first instant (UTC): a budget's reset."""
    d = datetime.fromtimestamp(ts, UTC)
    year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


class MonthCache:
    """The current UTC month and its end, recomputed only when the month changes."""

    def __init__(self) -> None:
        self._until = 0.0
        self._value = ("", 0.0)

    def current(self, now: float) -> tuple[str, float]:
        if now >= self._until or now < self._until - 32 * 86400:
            reset = next_month_start(now)
            self._value, self._until = (month_of(now), reset), reset
        return self._value


def instance_id(folder: Path | None) -> str:
    """This instance's stable name for its shares: ``folder/instance-id``, the file the limits
    plugin's quota shares are named by too (written by whichever starts first), or new per
    process without a folder."""
    if folder is None:
        return "i-" + secrets.token_hex(6)
    path = folder / "instance-id"
    if path.exists():
        return path.read_text().strip()
    folder.mkdir(parents=True, exist_ok=True)
    name = "i-" + secrets.token_hex(6)
    path.write_text(name + "\n")
    return name


class MonthlyAmounts:
    """Integers per (account, month), written to ``path`` once a second when they changed
    (atomic replace; this month and the last kept); None keeps them in memory only."""

    def __init__(self, path: Path | None, flush_every: float = 1.0) -> None:
        self.path = path
        self.flush_every = flush_every
        self._amounts: dict[str, dict[str, int]] = {}
        self._dirty = False
        self._task: asyncio.Task[None] | None = None
        if path is not None and path.exists():
            data = orjson.loads(path.read_bytes())
            self._amounts = {m: {a: int(n) for a, n in acc.items()} for m, acc in data.items()}

    def used(self, account: str, month: str) -> int:
        accounts = self._amounts.get(month)
        return accounts.get(account, 0) if accounts is not None else 0

    def add(self, account: str, month: str, n: int) -> None:
        accounts = self._amounts.get(month)
        if accounts is None:
            accounts = self._amounts[month] = {}
        accounts[account] = max(0, accounts.get(account, 0) + n)
        self._dirty = True

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {m: dict(accounts) for m, accounts in self._amounts.items()}

    async def forget(self, account: str) -> int:
        n = sum(acc.pop(account, None) is not None for acc in self._amounts.values())
        self._dirty = self._dirty or n > 0
        return n

    def flush(self) -> None:
        if self.path is None or not self._dirty:
            return
        self._dirty = False
        keep = sorted(self._amounts)[-2:]
        self._amounts = {m: self._amounts[m] for m in keep}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(self._amounts))
        os.replace(tmp, self.path)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_every)
            await asyncio.to_thread(self.flush)

    def start(self) -> None:
        if self.path is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.flush()


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
    """In process: spent per (account, month) persisted by ``MonthlyQuota``; reservations in
    memory only (they end with the process, and so do the requests they belong to)."""

    def __init__(self, path: Path | None) -> None:
        self.spent = MonthlyAmounts(path)
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
# estimate. Returns {0, 0} with every estimate reserved, or {i, total}: account i (1-based)
# would pass its limit (spent + reserved of every instance), nothing reserved.
_RESERVE = """
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
_RESTORE = """
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
"""


class RedisLedger:
    """Shared by instances on Redis; this instance's shares kept in ``own`` (see the module
    docstring)."""

    def __init__(
        self,
        url: str,
        own: MemoryLedger,
        instance: str,
        watch: StateWatch | None,
        prefix: str = "tollway:budget:",
    ) -> None:
        import redis.asyncio as aioredis  # only a Redis deployment loads redis-py

        self.client: Any = aioredis.from_url(url)
        self.own = own
        self.instance = instance
        self.watch = watch
        self.prefix = prefix
        self._others: dict[tuple[str, str], int] = {}  # others' spent + reserved, last seen
        self._opened = False
        self._reserve = self.client.register_script(_RESERVE)
        self._settle = self.client.register_script(_SETTLE)
        self._restore = self.client.register_script(_RESTORE)

    def _shared(self) -> bool:
        return self.watch is None or self.watch.available

    def _lost(self, exc: Exception) -> None:
        if self.watch is None or not is_state_error(exc):
            raise exc
        self.watch.failed(exc)

    def _args(self, month: str) -> list[Any]:
        return [month, self.instance, TTL]

    def reserve_now(self, month: str, charges: list[Charge]) -> tuple[int, int] | None:
        return None if self._shared() else self._reserve_alone(month, charges)

    def _reserve_alone(self, month: str, charges: list[Charge]) -> tuple[int, int]:
        for i, c in enumerate(charges):
            if c.limit >= 0:
                total = self._others.get((c.account, month), 0) + self.own.total(c.account, month)
                if total + c.estimate > c.limit:
                    return i, total
        self.own.hold(month, charges)
        return ADMITTED, 0

    async def reserve(self, month: str, charges: list[Charge]) -> tuple[int, int]:
        if self._shared():
            args = self._args(month)
            for c in charges:
                args += [c.limit, c.estimate]
            try:
                index, total = await self._reserve(
                    keys=[self.prefix + c.account for c in charges], args=args
                )
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
                return [int(t) for t in totals]
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
            fields = await self.client.hkeys(self.prefix + account)
            await self.client.delete(self.prefix + account)
            n = max(n, len({f.split(b"/", 1)[0] for f in fields}))
        n = max(n, await self.own.forget(accounts))
        for k in [k for k in self._others if k[0] in accounts]:
            del self._others[k]
        return n

    async def restore(self) -> None:
        """Put this instance's shares back: spent raised to its own, reservations set to what
        is in flight here (after Redis lost its data, or an outage)."""
        counts = self.own.spent.snapshot()
        keys = {(a, m) for m, accounts in counts.items() for a in accounts}
        keys |= set(self.own.reserved)
        if not keys:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for account, month in keys:
                await self._restore(
                    keys=[self.prefix + account],
                    args=[
                        f"{month}/s/{self.instance}",
                        self.own.spent.used(account, month),
                        f"{month}/r/{self.instance}",
                        self.own.reserved.get((account, month), 0),
                        TTL,
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

    async def open(self) -> None:
        if self._opened:
            return
        self._opened = True
        await self.own.open()
        try:
            await self._drop_stale_reservations()
            await self.restore()
        except Exception as e:
            self._lost(e)

    async def close(self) -> None:
        await self.own.close()
        await self.client.aclose()


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
