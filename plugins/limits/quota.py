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

from pathlib import Path
from typing import Protocol

from proxy.shares import SHARE_TTL, MonthlyCounts, RedisShares
from proxy.statedir import instance_id
from proxy.statewatch import EpochChanged, StateWatch, epoch_guard


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


class MonthlyQuota(MonthlyCounts):
    """Requests per (user, month); persisted to ``path`` (None keeps them in memory only)."""

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
        # ``used``, inlined: asked on every request whose plan has quota alerts
        users = self._counts.get(month)
        return users.get(user, 0) if users is not None else 0

    async def give_back(self, user: str, month: str) -> None:
        """A request refused by a later check, or that ended in an error, does not count."""
        self.add(user, month, -1)

    async def open(self) -> None:
        self.start()


# KEYS[1] user hash; ARGV: own field, month, limit, ttl, epoch (proxy.statewatch.epoch_guard).
# Returns the month's total after counting this request, or -1 (nothing counted) when that
# would pass the limit, -2 (nothing counted) when Redis lost its data since. A field named
# just MONTH is a count kept before per-instance shares existed: it still counts.
_TAKE = (
    epoch_guard("-2")
    + """
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
)

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


class RedisQuota(RedisShares[MonthlyQuota]):
    """Monthly counts on Redis, one hash per user (a field per month and instance)."""

    def __init__(
        self,
        url: str,
        own: MonthlyQuota | None = None,
        instance: str | None = None,
        watch: StateWatch | None = None,
        prefix: str = "tollway:quota:",
    ) -> None:
        super().__init__(
            url,
            own if own is not None else MonthlyQuota(None),
            instance or instance_id(None),
            watch,
            prefix,
        )
        self._take = self.client.register_script(_TAKE)
        self._give_back = self.client.register_script(_GIVE_BACK)
        self._restore = self.client.register_script(_RESTORE)

    def _counts(self) -> MonthlyQuota:
        return self.own

    def take_now(self, user: str, month: str, limit: int) -> bool | None:
        """None while Redis is reachable (the shared count decides: ``take``); decided here
        while this instance decides alone."""
        return None if self._shared() else self._take_alone(user, month, limit)

    async def take(self, user: str, month: str, limit: int) -> bool:
        """Count one request if the quota allows it; False (and nothing counted) otherwise."""
        if self._shared():
            epoch = None if self.watch is None else self.watch.epoch
            try:
                total = int(
                    await self._take(
                        keys=[self.prefix + user],
                        args=[self._field(month), month, limit, SHARE_TTL, epoch or b""],
                    )
                )
                if total == -2 and epoch:  # emptied by a restart the watch has not seen yet
                    raise EpochChanged(epoch)
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
        return self.prefix + user, [self._field(month), month, str(limit), str(SHARE_TTL)]

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

    async def _put_back(self, counts: dict[str, dict[str, int]]) -> None:
        """Raise each field to the instance's own count (``_RESTORE``)."""
        if not counts:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for month, users in counts.items():
                for user, n in users.items():
                    await self._restore(
                        keys=[self.prefix + user],
                        args=[self._field(month), n, SHARE_TTL],
                        client=pipe,
                    )
            await pipe.execute()

    async def forget(self, user: str) -> int:
        """Drop the user's counts; returns how many months had one. Raises when Redis is
        unreachable: a deletion must not be reported done when it was not."""
        n = await self._drop(user)
        await self.own.forget(user)
        return n


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
