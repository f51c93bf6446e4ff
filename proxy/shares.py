"""A monthly amount per subject, counted as per-instance shares in Redis with a local record.

Monthly quotas (requests per user) and budgets (money per account) keep their amounts the
same way, and this module is that way:

- ``MonthlyCounts``: this instance's own integers per (subject, month), in memory (the hot
  path touches a dict) and written to a JSON file in ``state.dir`` once a second when they
  changed, and at shutdown (atomic replace; this month and the last kept). It is the durable
  record: a restart loads it, so it never starts a month afresh.
- ``RedisShares``: the shared variant's common part. One hash per subject
  (``PREFIX + SUBJECT``) with fields named by month and instance, so each instance's share is
  a field only it writes; Redis holds a copy, never the only record. When Redis comes back
  empty, or after an outage, each instance puts its shares back from its own record
  (``restore``; the subclass writes its fields, ``_put_back``), again while amounts decided
  alone changed meanwhile. A process that starts after a crash first raises its record to its
  own shares in Redis (``_catch_up``): the file is written once a second, so Redis may hold
  the last second of amounts the file missed, and a later empty Redis would otherwise be
  re-seeded without them (handed out, or spent, again). While Redis is unreachable an
  instance decides alone: the others' total as last seen (``_others``) plus its own.

What each amount means (a request's place in a quota; money spent and reserved), the scripts
that take and settle it, and how a share is put back stay with the plugin that counts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import orjson

from proxy.redisurl import redis_url, timeouts
from proxy.statewatch import StateWatch, is_state_error

SHARE_TTL = 62 * 86400
"""Seconds a subject's Redis hash outlives its last change: this month's and the last month's
shares stay (the usage page, the invoice of the month just ended)."""


class MonthlyCounts:
    """Integers per (subject, month), never below 0, written to ``path`` once a second when
    they changed (None keeps them in memory only)."""

    def __init__(self, path: Path | None, flush_every: float = 1.0) -> None:
        self.path = path
        self.flush_every = flush_every
        self._counts: dict[str, dict[str, int]] = {}
        self._dirty = False
        self._task: asyncio.Task[None] | None = None
        if path is not None and path.exists():
            data = orjson.loads(path.read_bytes())
            self._counts = {m: {s: int(n) for s, n in subs.items()} for m, subs in data.items()}

    def used(self, subject: str, month: str) -> int:
        subjects = self._counts.get(month)
        return subjects.get(subject, 0) if subjects is not None else 0

    def add(self, subject: str, month: str, n: int = 1) -> None:
        subjects = self._counts.get(month)
        if subjects is None:
            subjects = self._counts[month] = {}
        subjects[subject] = max(0, subjects.get(subject, 0) + n)
        self._dirty = True

    def snapshot(self) -> dict[str, dict[str, int]]:
        """A copy of the counts, ``{month: {subject: count}}``."""
        return {m: dict(subjects) for m, subjects in self._counts.items()}

    async def forget(self, subject: str) -> int:
        """Drop the subject's counts; returns how many months had one."""
        n = sum(subs.pop(subject, None) is not None for subs in self._counts.values())
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

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_every)
            if self._dirty:  # unchanged (no budget spent this second): no thread hop at all
                await asyncio.to_thread(self.flush)

    def start(self) -> None:
        """Start the flushing task (idempotent; nothing to do without a file)."""
        if self.path is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop flushing and write what is pending (at shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task  # sleeps and a thread: no Redis call can swallow the cancel
            self._task = None
        self.flush()


class OwnRecord(Protocol):
    """What ``RedisShares`` needs of the instance's own record."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...


OwnT = TypeVar("OwnT", bound=OwnRecord)


class RedisShares(Generic[OwnT]):
    """The common part of a monthly amount shared on Redis: the client, this instance's name
    and own record, the choice between the shared count and deciding alone, the catch-up after
    a crash and the re-seeding that puts the shares back. A subclass adds its scripts, names
    its durable counts (``_counts``) and share fields (``SHARE_INFIX``), writes its shares
    (``_put_back``), and counts each amount it decides alone in ``_changes``."""

    SHARE_INFIX = "/"
    """What stands between the month and the instance in the name of the field holding this
    instance's durable share (``MONTH + SHARE_INFIX + INSTANCE``)."""

    def __init__(
        self, url: str, own: OwnT, instance: str, watch: StateWatch | None, prefix: str
    ) -> None:
        import redis.asyncio as aioredis  # only a Redis deployment loads redis-py

        self.client: Any = aioredis.from_url(redis_url(url), **timeouts(url))
        self.own = own
        self.instance = instance
        self.watch = watch
        self.prefix = prefix
        # the others' total per (subject, month) as last seen: what a decision made alone
        # (Redis unreachable) adds this instance's own amount to
        self._others: dict[tuple[str, str], int] = {}
        self._opened = False
        # amounts decided alone (Redis unreachable, or being re-seeded): ``restore`` repeats
        # while this changes under it
        self._changes = 0
        # the durable counts as this process found them, until it has caught up with its
        # shares in Redis (``_catch_up``)
        self._base: dict[str, dict[str, int]] | None = None

    def _counts(self) -> MonthlyCounts:
        """The durable part of the own record, the counts the share fields mirror."""
        raise NotImplementedError

    def _field(self, month: str) -> str:
        """This instance's durable share field of ``month``."""
        return month + self.SHARE_INFIX + self.instance

    def _shared(self) -> bool:
        """Whether the shared count decides (Redis reachable, or no watch to say otherwise)."""
        return self.watch is None or self.watch.available

    def _lost(self, exc: Exception) -> None:
        """A Redis call failed: an outage (decide alone from now on) or a bug (raise)."""
        if self.watch is None or not is_state_error(exc):
            raise exc
        self.watch.failed(exc)

    async def _drop(self, subject: str) -> int:
        """Delete the subject's hash and what is known of the others' shares; how many months
        it had (a field's name starts with its month). Raises when Redis is unreachable: a
        deletion must not be reported done when it was not."""
        key = self.prefix + subject
        fields = await self.client.hkeys(key)
        await self.client.delete(key)
        for k in [k for k in self._others if k[0] == subject]:
            del self._others[k]
        return len({f.split(b"/", 1)[0] for f in fields})

    async def _catch_up(self) -> None:
        """Once, at this process's first contact with Redis: raise the durable counts by what
        Redis holds of this instance beyond them (its shares: only this instance writes its
        fields). A previous process of this instance may have been killed before writing its
        last second to the file; Redis still has it. Added to the counts rather than set, so
        amounts counted alone since this process started (Redis unreachable) are kept too.
        Every read comes before the first addition, so a failed read leaves it to be done
        again whole."""
        base = self._base
        if base is None:
            return
        keys = [k async for k in self.client.scan_iter(match=self.prefix + "*", count=1000)]
        suffix = (self.SHARE_INFIX + self.instance).encode()
        ahead: list[tuple[str, str, int]] = []
        if keys:
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                shares = await pipe.execute(raise_on_error=False)
            for key, fields in zip(keys, shares, strict=True):
                if not isinstance(fields, dict):
                    continue  # not a hash of these shares
                subject = key[len(self.prefix) :].decode()
                for f, v in fields.items():
                    if f.endswith(suffix):
                        month = f[: -len(suffix)].decode()
                        n = int(v) - base.get(month, {}).get(subject, 0)
                        if n > 0:
                            ahead.append((subject, month, n))
        counts = self._counts()
        for subject, month, n in ahead:
            counts.add(subject, month, n)
        self._base = None

    async def _put_back(self, counts: dict[str, dict[str, int]]) -> None:
        """Write this instance's shares into Redis from ``counts`` (the durable counts'
        snapshot) and whatever else of the own record the subclass shares: a share is raised
        to the own amount, never lowered (Redis may be ahead of a file flushed a moment before
        a crash)."""
        raise NotImplementedError

    async def restore(self) -> None:
        """Put this instance's shares back (after Redis lost them, or an outage). First, once
        per process, the own counts catch up with Redis (``_catch_up``). Repeated while
        amounts decided alone changed the record meanwhile, so the shares are complete when
        the state is shared again."""
        await self._catch_up()
        for _ in range(3):
            changes = self._changes
            counts = self._counts().snapshot()
            if counts:
                oldest = min(counts)
                for k in [k for k in self._others if k[1] < oldest]:
                    del self._others[k]  # months the own file no longer keeps
            await self._put_back(counts)
            if self._changes == changes:
                return

    async def _seed(self) -> None:
        """At the first open: put this instance's shares back into Redis (which may have lost
        them while the instance was down)."""
        await self.restore()

    async def open(self) -> None:
        """Start keeping the own record and put the shares back (idempotent: a reload's chain
        gets the same object); the durable counts as found are the base ``_catch_up``
        compares Redis with. Redis unreachable starts an outage: the watch calls ``restore``
        once it is back."""
        if self._opened:
            return
        self._opened = True
        self._base = self._counts().snapshot()
        await self.own.open()
        try:
            await self._seed()
        except Exception as e:
            self._lost(e)

    async def close(self) -> None:
        await self.own.close()
        await self.client.aclose()
