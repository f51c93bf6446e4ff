"""Issued keys shared by every instance through Redis (``state.url: redis://...``).

Each instance keeps answering from its own in-memory ``KeyStore`` (a request never waits on
Redis to authenticate); this keeps those stores equal. Redis holds every issued key's record
(a hash, ``tollway:keys:records``: SHA-256 -> record; never the key itself), and changes are
announced on a channel, so a key created through one instance's admin API works on all of them
within milliseconds, and a revoked one stops working everywhere. Revocations leave
tombstones (``tollway:keys:revoked``: SHA-256 -> time) beside the records.

Redis holds a copy, never the only record: every instance keeps its keys and tombstones in its
``keys.json`` (``proxy.keystore``), and a sync merges both ways: the instance takes in what
Redis has, and puts back the records and tombstones Redis lacks. A tombstone wins over a
record, so an empty Redis (restarted without persistence) is re-seeded with every issued key
and brings back no revoked one. A sync runs at start, after every re-subscription (the
connection broke: announcements may have been missed), when the state watch reports a restart
or the end of an outage (``proxy.statewatch``), and every ``resync`` seconds. Retired secrets
whose grace period ended are pruned from Redis as from the files (``proxy.keystore``): by
every sync, and by the instance that pruned them locally (``forget``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson

from proxy import tasks
from proxy.keystore import KeyRecord, KeyStore
from proxy.redisurl import redis_url, timeouts
from proxy.statewatch import StateWatch, is_state_error

log = logging.getLogger("tollway.keys")


class KeySync:
    def __init__(
        self,
        store: KeyStore,
        url: str,
        watch: StateWatch | None = None,
        prefix: str = "tollway:keys:",
        resync: float = 30.0,
    ) -> None:
        import redis.asyncio as aioredis  # only a Redis deployment loads redis-py

        self.store = store
        self.client: Any = aioredis.from_url(redis_url(url), **timeouts(url))
        self.watch = watch
        self.records = prefix + "records"
        self.revoked = prefix + "revoked"
        self.channel = prefix + "events"
        self.resync = resync
        self.retry = watch.interval if watch is not None else 1.0
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub: Any = None

    async def start(self) -> None:
        """Subscribe, merge with Redis, then follow changes. With Redis unreachable the
        instance starts on its own ``keys.json``; the follower merges once it is back."""
        try:
            await self._subscribe()  # before merging: no change falls in between
            await self.sync()
        except Exception as e:
            if not is_state_error(e):
                raise
            self._failed(e)
            await self._unsubscribe()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow()), loop.create_task(self._resync())]
        if self.watch is not None:
            self.watch.on_recover(self.sync)

    async def _subscribe(self) -> None:
        self._pubsub = self.client.pubsub()
        await self._pubsub.subscribe(self.channel)

    async def _unsubscribe(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    def _failed(self, exc: BaseException) -> None:
        if self.watch is not None:
            self.watch.failed(exc)  # the watch logs the outage, once per interval
        else:
            log.warning("shared key store unreachable (%s)", type(exc).__name__)

    async def sync(self) -> None:
        """Merge this instance's keys and tombstones with Redis's, both ways."""
        async with self.client.pipeline(transaction=True) as pipe:  # one consistent view
            pipe.hgetall(self.records)
            pipe.hgetall(self.revoked)
            raw, dead = await pipe.execute()
        copy = {k: KeyRecord.from_dict(orjson.loads(v)) for k, v in raw.items()}
        missing, buried = self.store.merge(
            copy.values(), {k.decode(): float(v) for k, v in dead.items()}
        )
        tombstones = self.store.revoked
        now = time.time()
        stale = [k for k, rec in copy.items() if k.decode() in tombstones or rec.spent(now)]
        if not (missing or buried or stale):
            return
        async with self.client.pipeline(transaction=True) as pipe:
            if buried:
                pipe.hset(self.revoked, mapping=buried)
            if stale:
                pipe.hdel(self.records, *stale)
            for rec in missing:  # absent from the copy, or an older version there
                pipe.hset(self.records, rec.sha256, orjson.dumps(rec.to_dict()))
            await pipe.execute()
        if missing or buried:
            log.info(
                "put back %d keys and %d revocations the shared key store lacked",
                len(missing),
                len(buried),
            )

    async def add(self, *recs: KeyRecord) -> None:
        """Publish keys created or changed here (a new key before its secret is shown to
        anyone; an update; a rotation's new and retired secrets, in that order)."""
        for rec in recs:
            data = orjson.dumps(rec.to_dict())
            await self.client.hset(self.records, rec.sha256, data)
            await self.client.publish(self.channel, b"add " + data)

    async def forget(self, recs: list[KeyRecord]) -> None:
        """Drop retired secrets this instance pruned (grace ended) from Redis; no tombstone
        and no announcement: every instance prunes them by their own expiry."""
        if recs:
            await self.client.hdel(self.records, *(r.sha256 for r in recs))

    async def remove(self, recs: list[KeyRecord]) -> None:
        """Revoke keys everywhere."""
        if not recs:
            return
        now = time.time()
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.revoked, mapping={r.sha256: now for r in recs})
            pipe.hdel(self.records, *(r.sha256 for r in recs))
            await pipe.execute()
        for rec in recs:
            await self.client.publish(self.channel, b"del " + rec.sha256.encode())

    async def _follow(self) -> None:
        """Apply announcements; after a broken connection, subscribe again and merge (what
        was announced meanwhile is in Redis's records and tombstones)."""
        while True:
            try:
                if self._pubsub is None:
                    await self._subscribe()
                    await self.sync()
                msg = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if is_state_error(e):
                    self._failed(e)
                else:
                    log.warning("key announcements interrupted (%s); retrying", type(e).__name__)
                await self._unsubscribe()
                await asyncio.sleep(self.retry)
                continue
            if msg is None:
                continue
            op, _, payload = bytes(msg["data"]).partition(b" ")
            if op == b"add":
                self.store.apply_remote(KeyRecord.from_dict(orjson.loads(payload)))
            elif op == b"del":
                self.store.drop_remote(payload.decode())

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.resync)
            try:
                await self.sync()
            except Exception as e:
                if is_state_error(e):
                    self._failed(e)
                else:
                    log.warning(
                        "key resync failed (%s); next try in %ss", type(e).__name__, self.resync
                    )

    async def stop(self) -> None:
        for task in self._tasks:  # again if a cancellation is lost in redis-py (proxy.tasks)
            await tasks.stop(task, "the key follower")
        await self._unsubscribe()
        await self.client.aclose()
