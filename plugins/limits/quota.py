"""Monthly request quotas per user, counted per calendar month (UTC), kept across restarts.

Counts live in memory (the hot path only touches a dict) and are written to a small JSON file
by a background task once a second when they changed, and at shutdown; a restart loads them, so
it never hands out a fresh quota. A process killed with SIGKILL can lose at most the last second
of counts (the usage table of the metering plugin is the exact record).

With ``state.url`` on Redis, ``RedisQuota`` keeps the counts there instead, so every instance
draws from one quota: a request takes its place atomically (one script: count it, sum the
month, take it back when that went over), so N instances can never hand out more than the
tier's requests between them.

Redis holds a copy, never the only record. A user's hash (``tollway:quota:USER``) has one field
per month and instance (``2025-06/i-3f2a...``): each instance's own share, which the instance
also counts in its own file (``MonthlyQuota``, ``state.dir/quota.json``, flushed once a second;
the instance id is kept in ``state.dir/instance-id``). When Redis comes back empty, or after an
outage, every instance puts its shares back (``restore``: a field is raised to the instance's
count, never lowered), so a restarted Redis resets no quota. An instance that starts again
after a crash first takes its own shares from Redis where they are ahead of its file (the
requests of its last second, counted in Redis and not yet written): else a later restart of
Redis would be re-seeded with the file's lower count and hand those requests out again. What
can be lost is what an instance counted in its last second before a crash that coincided with
Redis losing its data.
While Redis is unreachable an instance decides alone (``state.on_unavailable: serve``): the
month's total as last seen plus its own requests since; the shares are put back on recovery.

Both speak one interface, ``Quota``, and ``open_quota`` picks one when the plugin starts. Its
``take_now`` lets the in-process quota decide with a dict lookup and no coroutine, so the hot
path pays nothing for the shared variant existing; the Redis quota answers there only while it
decides alone, and otherwise defers to ``await take(...)``.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson

from proxy.statewatch import StateWatch, is_state_error

QUOTA_TTL = 62 * 86400
"""Seconds a user's Redis counts outlive their last request (this month's and the last)."""


def month_of(ts: float) -> str:
    """``YYYY-MM`` of a UNIX time, in UTC."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m")


def next_month_start(ts: float) -> float:
    """UNIX time of the first instant of the next calendar month (UTC): the quota reset."""
    d = datetime.fromtimestamp(ts, UTC)
    year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


class Quota(Protocol):
    """Monthly request counts per user: what the limits plugin asks, whichever store holds them.

    A request takes its place before it is served and gives it back if it is refused later or
    fails, so a count is never checked in one step and added in another."""

    def take_now(self, user: str, month: str, limit: int) -> bool | None:
        """Count one request if fewer than ``limit`` are counted: True, or False with nothing
        counted. None when this cannot be decided without awaiting the shared store: then
        ``await take(...)`` decides. Synchronous so the in-process quota costs no coroutine."""
        ...

    async def take(self, user: str, month: str, limit: int) -> bool:
        """As ``take_now``, always decided."""
        ...

    def script_part(self, user: str, month: str, limit: int) -> tuple[str, list[str]] | None:
        """When ``take_now`` answered None: the shared count's key and arguments, so the rate
        windows can take the place in their own script (one round trip per request; then
        ``taken`` with the total); None: ``await take(...)``."""
        ...

    def taken(self, user: str, month: str, total: int) -> None:
        """A place was taken by the windows' script (``script_part``); ``total`` is the
        month's count with it."""
        ...

    def count_now(self, user: str, month: str) -> int:
        """The month's count as this instance knows it, exact right after it took a place
        (the shared count the place was taken with): what a threshold alert compares on the
        request path. Synchronous, a dict lookup or two, no round trip (``count`` reads the
        shared store)."""
        ...

    async def give_back(self, user: str, month: str) -> None:
        """Uncount one request (refused by a later check, or failed: failures are not billed)."""
        ...

    async def forget(self, user: str) -> int:
        """Drop the user's counts; how many months had one. Raises if it could not."""
        ...

    async def count(self, user: str, month: str) -> int:
        """The requests counted for ``user`` in ``month`` (every instance's, when shared): a
        read for the key holder's own usage page, never made on the request path."""
        ...

    async def open(self) -> None:
        """Start keeping the counts (idempotent: a reload's chain gets the same object)."""
        ...

    async def close(self) -> None:
        """Write what is pending and release connections (at shutdown)."""
        ...


class MonthlyQuota:
    """Requests per (user, month); persisted to ``path`` (None keeps them in memory only)."""

    def __init__(self, path: Path | None, flush_every: float = 1.0) -> None:
        self.path = path
        self.flush_every = flush_every
        self._counts: dict[str, dict[str, int]] = {}
        self._dirty = False
        self._task: asyncio.Task[None] | None = None
        if path is not None and path.exists():
            data = orjson.loads(path.read_bytes())
            self._counts = {m: {u: int(n) for u, n in users.items()} for m, users in data.items()}

    def used(self, user: str, month: str) -> int:
        return self._counts.get(month, {}).get(user, 0)

    def add(self, user: str, month: str, n: int = 1) -> None:
        users = self._counts.setdefault(month, {})
        users[user] = max(0, users.get(user, 0) + n)
        self._dirty = True

    def snapshot(self) -> dict[str, dict[str, int]]:
        """A copy of the counts, ``{month: {user: count}}``."""
        return {m: dict(users) for m, users in self._counts.items()}

    def take_now(self, user: str, month: str, limit: int) -> bool:
        """Always decided here: one dict lookup (``Quota.take_now``)."""
        users = self._counts.get(month)
        if users is None:
            users = self._counts[month] = {}
        n = users.get(user, 0)
        if n >= limit:
            return False
        users[user] = n + 1
        self._dirty = True
        return True

    async def take(self, user: str, month: str, limit: int) -> bool:
        return self.take_now(user, month, limit)

    async def count(self, user: str, month: str) -> int:
        return self.used(user, month)

    def script_part(self, user: str, month: str, limit: int) -> None:
        """Never: ``take_now`` always decides in process."""
        return None

    def taken(self, user: str, month: str, total: int) -> None:
        self.add(user, month)

    def count_now(self, user: str, month: str) -> int:
        return self.used(user, month)

    async def give_back(self, user: str, month: str) -> None:
        """A request refused by a later check, or that ended in an error, does not count."""
        self.add(user, month, -1)

    async def forget(self, user: str) -> int:
        """Drop the user's counts; returns how many months had one."""
        n = sum(users.pop(user, None) is not None for users in self._counts.values())
        self._dirty = self._dirty or n > 0
        return n

    def flush(self) -> None:
        """Write the counts if they changed (atomic replace; only this and the last month)."""
        if self.path is None or not self._dirty:
            return
        self._dirty = False
        keep = sorted(self._counts)[-2:]
        self._counts = {m: self._counts[m] for m in keep}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(self._counts))
        os.replace(tmp, self.path)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_every)
            await asyncio.to_thread(self.flush)

    def start(self) -> None:
        if self.path is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def open(self) -> None:
        self.start()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.flush()


def instance_id(folder: Path | None) -> str:
    """This instance's stable name for its quota shares: kept in ``folder/instance-id``
    (each instance needs a state.dir of its own), or new per process without a folder."""
    if folder is None:
        return "i-" + secrets.token_hex(6)
    path = folder / "instance-id"
    if path.exists():
        return path.read_text().strip()
    folder.mkdir(parents=True, exist_ok=True)
    name = "i-" + secrets.token_hex(6)
    path.write_text(name + "\n")
    return name


# KEYS[1] user hash; ARGV: own field, month, limit, ttl. Returns the month's total after
# counting this request, or -1 (nothing counted) when that would pass the limit. A field named
# just MONTH is a count kept before per-instance shares existed: it still counts.
_TAKE = """
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
local total, month, prefix = 0, ARGV[2], ARGV[2] .. '/'
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local f = fields[i]
  if f == month or string.sub(f, 1, #prefix) == prefix then total = total + tonumber(fields[i + 1]) end
end
if total > tonumber(ARGV[3]) then
  redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
  return -1
end
return total
"""

_GIVE_BACK = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) < 0 then redis.call('HSET', KEYS[1], ARGV[1], 0) end
"""

# raise a share to the instance's own count (never lower it: Redis may be ahead of a file
# that was last flushed a moment before a crash)
_RESTORE = """
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
"""


class RedisQuota:
    """Monthly counts on Redis, one hash per user (a field per month and instance)."""

    def __init__(
        self,
        url: str,
        own: MonthlyQuota | None = None,
        instance: str | None = None,
        watch: StateWatch | None = None,
        prefix: str = "tollway:quota:",
    ) -> None:
        import redis.asyncio as aioredis  # only a Redis deployment loads redis-py

        self.client: Any = aioredis.from_url(url)
        self.prefix = prefix
        self.own = own if own is not None else MonthlyQuota(None)
        self.instance = instance or instance_id(None)
        self.watch = watch
        # the month's total of the other instances as last seen: what a decision made alone
        # (Redis unreachable) adds this instance's own count to
        self._others: dict[tuple[str, str], int] = {}
        self._changes = 0  # own counts changed while Redis was unreachable or being re-seeded
        self._opened = False
        # the own counts as this process found them, until it has caught up with its shares in
        # Redis (``_catch_up``)
        self._base: dict[str, dict[str, int]] | None = None
        self._take = self.client.register_script(_TAKE)
        self._give_back = self.client.register_script(_GIVE_BACK)
        self._restore = self.client.register_script(_RESTORE)

    def _field(self, month: str) -> str:
        return f"{month}/{self.instance}"

    def _shared(self) -> bool:
        return self.watch is None or self.watch.available

    def _lost(self, exc: Exception) -> None:
        """A Redis call failed: an outage (decide alone from now on) or a bug (raise)."""
        if self.watch is None or not is_state_error(exc):
            raise exc
        self.watch.failed(exc)

    def take_now(self, user: str, month: str, limit: int) -> bool | None:
        """None while Redis is reachable (the shared count decides: ``take``); decided here
        while this instance decides alone."""
        return None if self._shared() else self._take_alone(user, month, limit)

    async def take(self, user: str, month: str, limit: int) -> bool:
        """Count one request if the quota allows it; False (and nothing counted) otherwise."""
        if self._shared():
            try:
                total = int(
                    await self._take(
                        keys=[self.prefix + user],
                        args=[self._field(month), month, limit, QUOTA_TTL],
                    )
                )
            except Exception as e:
                self._lost(e)
            else:
                if total < 0:
                    return False
                self.taken(user, month, total)
                return True
        return self._take_alone(user, month, limit)

    def script_part(self, user: str, month: str, limit: int) -> tuple[str, list[str]] | None:
        """The hash and the arguments of ``_TAKE`` for the windows' admission script, which
        counts the place the same way; None while deciding alone."""
        if not self._shared():
            return None
        return self.prefix + user, [self._field(month), month, str(limit), str(QUOTA_TTL)]

    async def count(self, user: str, month: str) -> int:
        """The month's total over every instance's share (the sum ``_TAKE`` compares with the
        limit); while Redis is unreachable, the total this instance decides alone with."""
        if self._shared():
            try:
                fields = await self.client.hgetall(self.prefix + user)
            except Exception as e:
                self._lost(e)
            else:
                prefix = month.encode() + b"/"
                return sum(
                    int(v) for f, v in fields.items() if f == month.encode() or f.startswith(prefix)
                )
        return self._others.get((user, month), 0) + self.own.used(user, month)

    def taken(self, user: str, month: str, total: int) -> None:
        self.own.add(user, month)
        self._others[(user, month)] = total - self.own.used(user, month)

    def count_now(self, user: str, month: str) -> int:
        """The others' total as last seen plus this instance's own: the total the last take
        returned, with this instance's requests since."""
        return self._others.get((user, month), 0) + self.own.used(user, month)

    def _take_alone(self, user: str, month: str, limit: int) -> bool:
        """Redis unreachable: the others' total as last seen, plus this instance's own."""
        if self._others.get((user, month), 0) + self.own.used(user, month) >= limit:
            return False
        self.own.add(user, month)
        self._changes += 1
        return True

    async def give_back(self, user: str, month: str) -> None:
        """A request that ended in an error does not count."""
        self.own.add(user, month, -1)
        if self._shared():
            try:
                await self._give_back(keys=[self.prefix + user], args=[self._field(month)])
                return
            except Exception as e:
                self._lost(e)
        self._changes += 1

    async def _catch_up(self) -> None:
        """Once, at this process's first contact with Redis: raise the own counts by what
        Redis holds of this instance beyond them (its shares: only this instance writes its
        fields). A previous process of this instance may have been killed before writing its
        last second of counts to the file; Redis still has them. Added to the counts rather
        than set, so requests counted alone since this process started (Redis unreachable)
        are kept too."""
        if self._base is None:
            return
        keys = [k async for k in self.client.scan_iter(match=self.prefix + "*", count=1000)]
        suffix = ("/" + self.instance).encode()
        if keys:
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                shares = await pipe.execute(raise_on_error=False)
            for key, fields in zip(keys, shares, strict=True):
                if not isinstance(fields, dict):
                    continue  # not a quota hash
                user = key[len(self.prefix) :].decode()
                for f, v in fields.items():
                    if f.endswith(suffix):
                        month = f[: -len(suffix)].decode()
                        ahead = int(v) - self._base.get(month, {}).get(user, 0)
                        if ahead > 0:
                            self.own.add(user, month, ahead)
        self._base = None

    async def restore(self) -> None:
        """Put this instance's shares back (after Redis lost them, or an outage): each field
        is raised to the instance's own count. Repeated while requests counted alone changed
        the counts meanwhile, so the shares are complete when the state is shared again.
        First, once per process, the own counts catch up with Redis (``_catch_up``)."""
        await self._catch_up()
        for _ in range(3):
            changes = self._changes
            counts = self.own.snapshot()
            for k in [k for k in self._others if k[1] not in counts]:
                del self._others[k]  # months the own file no longer keeps
            if counts:
                async with self.client.pipeline(transaction=False) as pipe:
                    for month, users in counts.items():
                        for user, n in users.items():
                            await self._restore(
                                keys=[self.prefix + user],
                                args=[self._field(month), n, QUOTA_TTL],
                                client=pipe,
                            )
                    await pipe.execute()
            if self._changes == changes:
                return

    async def forget(self, user: str) -> int:
        """Drop the user's counts; returns how many months had one. Raises when Redis is
        unreachable: a deletion must not be reported done when it was not."""
        key = self.prefix + user
        fields = await self.client.hkeys(key)
        await self.client.delete(key)
        await self.own.forget(user)
        for k in [k for k in self._others if k[0] == user]:
            del self._others[k]
        return len({f.split(b"/", 1)[0] for f in fields})

    async def open(self) -> None:
        """Start keeping the own counts and put the shares back (idempotent: a reload's
        chain gets the same object)."""
        if self._opened:
            return
        self._opened = True
        self._base = self.own.snapshot()
        self.own.start()
        try:
            await self.restore()  # Redis may have lost them while this instance was down
        except Exception as e:
            self._lost(e)  # starts an outage: the watch restores once Redis is back

    async def close(self) -> None:
        await self.own.close()
        await self.client.aclose()


def open_quota(
    redis_url: str | None,
    path: Path | None,
    folder: Path | None,
    watch: StateWatch | None,
) -> Quota:
    """The quota for ``state``: this instance's own counts (``path``, None = memory only), or
    shared on ``redis_url`` with those own counts as the record Redis is re-seeded from (the
    instance's name kept in ``folder``). The one place the choice is made."""
    own = MonthlyQuota(path)
    if redis_url is None:
        return own
    remote = RedisQuota(redis_url, own, instance_id(folder), watch)
    if watch is not None:
        watch.on_recover(remote.restore)
    return remote
