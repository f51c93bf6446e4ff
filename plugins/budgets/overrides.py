"""Per-user budgets set through the admin API (``PUT /admin/budgets/{user}``).

The request path reads them from a dict. Each instance keeps them in ``state.dir/budgets-
users.json`` (written when they change), so they survive a restart. On Redis
(``state.url: redis://``) they are shared: the hash ``tollway:budget-users`` holds one JSON
record per user, which every instance reads into its dict every ``state.check_interval``; a
deletion is a record marked ``deleted`` (a tombstone), so that an instance putting its copies
back into a Redis that lost them (``restore``: the newer record of a user wins) cannot bring a
deleted budget back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

import orjson

from proxy.redisurl import redis_url as normal_url
from proxy.redisurl import timeouts
from proxy.statewatch import StateWatch, is_state_error

KEY = "tollway:budget-users"

# KEYS[1] the hash; ARGV: user, record (JSON), its time: set unless Redis holds a newer one
_RESTORE = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local ok, rec = pcall(cjson.decode, cur)
  if ok and type(rec) == 'table' and tonumber(rec['at'] or 0) >= tonumber(ARGV[3]) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


class UserBudgets:
    """``{user: {"usd", "basis", "alerts", "hard", "at"}}``: set, cleared, shared."""

    def __init__(
        self,
        path: Path | None,
        redis_url: str | None = None,
        watch: StateWatch | None = None,
        refresh_every: float = 1.0,
    ) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}  # tombstones included
        self.live: dict[str, dict[str, Any]] = {}  # what the request path reads
        if path is not None and path.exists():
            self.records = orjson.loads(path.read_bytes())
            self._index()
        self.watch = watch
        self.refresh_every = refresh_every
        self.client: Any = None
        self._task: asyncio.Task[None] | None = None
        if redis_url is not None:
            import redis.asyncio as aioredis

            self.client = aioredis.from_url(normal_url(redis_url), **timeouts(redis_url))
            self._restore = self.client.register_script(_RESTORE)
            if watch is not None:
                watch.on_recover(self.restore)

    def _index(self) -> None:
        self.live = {u: r for u, r in self.records.items() if not r.get("deleted")}

    def get(self, user: str) -> dict[str, Any] | None:
        return self.live.get(user)

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(self.records))
        os.replace(tmp, self.path)

    async def put(self, user: str, record: dict[str, Any]) -> None:
        """Set (or, with ``deleted``, clear) a user's budget everywhere; raises when the
        shared state is unreachable (nothing changed then)."""
        record = {**record, "at": time.time()}
        if self.client is not None:
            await self.client.hset(KEY, user, orjson.dumps(record))
        self.records[user] = record
        self._index()
        await asyncio.to_thread(self._save)

    async def refresh(self) -> None:
        """Take the shared records (Redis) as this instance's."""
        if self.client is None:
            return
        raw = await self.client.hgetall(KEY)
        records = {k.decode(): orjson.loads(v) for k, v in raw.items()}
        if records != self.records:
            if not records and self.records:
                return  # Redis lost them: the watch's restore puts them back
            self.records = records
            self._index()
            await asyncio.to_thread(self._save)

    async def restore(self) -> None:
        """Put this instance's records back into Redis; the newer record of a user wins."""
        if self.client is None or not self.records:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for user, rec in self.records.items():
                await self._restore(
                    keys=[KEY], args=[user, orjson.dumps(rec), rec.get("at", 0)], client=pipe
                )
            await pipe.execute()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_every)
            if self.watch is not None and not self.watch.available:
                continue
            try:
                await self.refresh()
            except Exception as e:
                if not is_state_error(e):
                    raise
                if self.watch is not None:
                    self.watch.failed(e)

    async def open(self) -> None:
        if self.client is None or self._task is not None:
            return
        try:
            await self.restore()
            await self.refresh()
        except Exception as e:
            if not is_state_error(e) or self.watch is None:
                raise
            self.watch.failed(e)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def forget(self, user: str) -> int:
        if user not in self.live:
            return 0
        await self.put(user, {"deleted": True})
        return 1

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.client is not None:
            await self.client.aclose()
