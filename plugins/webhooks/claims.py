"""Once across instances: a delivery is claimed in Redis before it is attempted.

Several instances may notice the same occurrence (two gateways both see a user past 80 % of a
shared quota). Each queues it in its own file, then claims it with ``SET tollway:webhook:KEY
INSTANCE NX EX keep_delivered``: the instance whose SET succeeds delivers it, the others settle
it as a ``duplicate``. A claim found holding this instance's own name is this instance's (a
restart between the claim and the delivery), so the instance name comes from
``state.dir/instance-id`` (``proxy.statedir.instance_id``), the name the quota shares use too.

Redis holds the claims as a copy: when it comes back empty (a restart without persistence, a
flush) the watch's ``on_recover`` puts back every claim this instance holds (settled as
delivered or failed, or owed and already claimed, from its file), as the quota shares and keys
are put back, so an instance noticing the occurrence again after that still loses the claim.
While Redis is unreachable a claim is undecided: the delivery waits and is claimed again later
(an alert late rather than twice).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from proxy.redisurl import redis_url
from proxy.statewatch import StateWatch, is_state_error

PREFIX = "tollway:webhook:"


class RedisClaims:
    """Claims of deliveries in Redis, one key each, expiring after ``keep`` seconds."""

    def __init__(self, url: str, instance: str, keep: float, watch: StateWatch | None) -> None:
        import redis.asyncio as aioredis  # only a Redis deployment loads redis-py

        self.client: Any = aioredis.from_url(
            redis_url(url), socket_timeout=5, socket_connect_timeout=5
        )
        self.instance = instance
        self.keep = max(1, int(keep))
        self.watch = watch

    def _lost(self, exc: Exception) -> None:
        if not is_state_error(exc):
            raise exc
        if self.watch is not None:
            self.watch.failed(exc)

    async def claim(self, key: str) -> bool | None:
        """True: this instance delivers it; False: another instance does; None: Redis is
        unreachable, ask again later."""
        if self.watch is not None and not self.watch.available:
            return None
        name = PREFIX + key
        try:
            if await self.client.set(name, self.instance, nx=True, ex=self.keep):
                return True
            holder = await self.client.get(name)
        except Exception as e:
            self._lost(e)
            return None
        if holder is None:  # expired between the two calls: try once more
            return bool(await self.client.set(name, self.instance, nx=True, ex=self.keep))
        return bool(holder.decode() == self.instance)

    async def reseed(self, held: Iterable[tuple[str, float]]) -> None:
        """Put back the claims this instance holds: ``(key, when it was settled or claimed)``;
        a claim another instance holds meanwhile is left to it."""
        now = time.time()
        async with self.client.pipeline(transaction=False) as pipe:
            n = 0
            for key, at in held:
                ttl = int(self.keep - (now - at))
                if ttl > 0:
                    pipe.set(PREFIX + key, self.instance, nx=True, ex=ttl)
                    n += 1
            if n:
                await pipe.execute()

    async def close(self) -> None:
        await self.client.aclose()
