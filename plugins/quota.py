"""Monthly request quotas per user, counted per calendar month (UTC), kept across restarts.

Counts live in memory (the hot path only touches a dict) and are written to a small JSON file
by a background task once a second when they changed, and at shutdown; a restart loads them, so
it never hands out a fresh quota. A process killed with SIGKILL can lose at most the last second
of counts (the usage table of the metering plugin is the exact record).

With ``state.url`` on Redis, ``RedisQuota`` keeps the counts there instead, so every instance
draws from one quota: a request takes its place atomically (``HINCRBY``, and back when that
went over), so N instances can never hand out more than the plan's requests between them.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import os
from datetime import UTC, datetime
from pathlib import Path

import orjson

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

    async def give_back(self, user: str, month: str) -> None:
        """A request that ended in an error does not count (``RedisQuota``'s interface too)."""
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

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.flush()


class RedisQuota:
    """Monthly counts on Redis, one hash per user (``month -> count``), shared by instances."""

    def __init__(self, url: str, prefix: str = "tollway:quota:") -> None:
        import redis.asyncio as aioredis  # only a Redis deployment loads redis-py

        self.client = aioredis.from_url(url)
        self.prefix = prefix

    async def take(self, user: str, month: str, limit: int) -> bool:
        """Count one request if the quota allows it; False (and nothing counted) otherwise."""
        key = self.prefix + user
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hincrby(key, month, 1)
            pipe.expire(key, QUOTA_TTL)
            count, _ = await pipe.execute()
        if int(count) > limit:
            await self.client.hincrby(key, month, -1)
            return False
        return True

    async def give_back(self, user: str, month: str) -> None:
        """A request that ended in an error does not count."""
        if int(await self.client.hincrby(self.prefix + user, month, -1)) < 0:
            await self.client.hset(self.prefix + user, month, 0)  # the user was forgotten

    async def forget(self, user: str) -> int:
        """Drop the user's counts; returns how many months had one."""
        key = self.prefix + user
        months = int(await self.client.hlen(key))
        await self.client.delete(key)
        return months

    async def stop(self) -> None:
        await self.client.aclose()
