"""Issued keys shared by every instance through Redis (``state.url: redis://...``).

Each instance keeps answering from its own in-memory ``KeyStore`` (a request never waits on
Redis to authenticate); this keeps those stores equal. Redis holds every issued key's record
(a hash, ``tollway:keys:records``: SHA-256 -> record; never the key itself), and changes are
announced on a channel, so a key created through one instance's admin API works on all of them
within milliseconds, and a revoked one stops working everywhere. An instance loads the whole
set when it starts (offering Redis the keys of its own ``keys.json`` that Redis does not have
yet: the first instance of a deployment seeds it) and loads it again every ``resync`` seconds,
which heals an announcement missed while the connection was down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import asdict
from typing import Any

import orjson

from proxy.keystore import KeyRecord, KeyStore

log = logging.getLogger("tollway.keys")


class KeySync:
    def __init__(
        self, store: KeyStore, url: str, prefix: str = "tollway:keys:", resync: float = 30.0
    ) -> None:
        import redis.asyncio as aioredis  # only a Redis deployment loads redis-py

        self.store = store
        self.client: Any = aioredis.from_url(url)
        self.records = prefix + "records"
        self.channel = prefix + "events"
        self.resync = resync
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub: Any = None

    async def start(self) -> None:
        """Seed Redis with local keys it lacks, load the whole set, then follow changes."""
        mine = {r.sha256: r for r in self.store.list() if r.source == "api"}
        for sha, rec in mine.items():
            await self.client.hsetnx(self.records, sha, orjson.dumps(asdict(rec)))
        self._pubsub = pubsub = self.client.pubsub()
        await pubsub.subscribe(self.channel)  # before loading: no change falls in between
        await self.load()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._follow(pubsub)),
            loop.create_task(self._resync()),
        ]

    async def load(self) -> None:
        raw = await self.client.hgetall(self.records)
        records = [KeyRecord(**orjson.loads(v)) for v in raw.values()]
        self.store.replace_issued(records)

    async def add(self, rec: KeyRecord) -> None:
        """Publish a key created here (before its secret is shown to anyone)."""
        data = orjson.dumps(asdict(rec))
        await self.client.hset(self.records, rec.sha256, data)
        await self.client.publish(self.channel, b"add " + data)

    async def remove(self, recs: list[KeyRecord]) -> None:
        """Revoke keys everywhere."""
        if not recs:
            return
        await self.client.hdel(self.records, *(r.sha256 for r in recs))
        for rec in recs:
            await self.client.publish(self.channel, b"del " + rec.sha256.encode())

    async def _follow(self, pubsub: Any) -> None:
        while True:
            try:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the connection broke: the resync heals what was missed
                log.warning("key announcements interrupted (%s); retrying", type(e).__name__)
                await asyncio.sleep(1.0)
                continue
            if msg is None:
                continue
            op, _, payload = bytes(msg["data"]).partition(b" ")
            if op == b"add":
                self.store.apply_remote(KeyRecord(**orjson.loads(payload)))
            elif op == b"del":
                self.store.drop_remote(payload.decode())

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.resync)
            try:
                await self.load()
            except Exception as e:
                log.warning(
                    "key resync failed (%s); next try in %ss", type(e).__name__, self.resync
                )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._pubsub is not None:
            await self._pubsub.aclose()
        await self.client.aclose()
