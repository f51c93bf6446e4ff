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

The shared outbox: an instance that dies for good (a replaced pod, its ``state.dir`` gone)
must not take what it owed with it, so the claim also mirrors the delivery into Redis, in the
same script: its record in the hash ``tollway:webhook:owed``, its holder in
``tollway:webhook:holder``, and a lease in the sorted set ``tollway:webhook:due`` (score: the
UNIX time, by Redis's clock, at which the lease runs out). The holder renews the leases of all
it holds every third of ``lease`` (recording each delivery's attempts as it goes); when a
delivery is settled it is removed. Every instance also looks, at the same pace, for leases run
out and takes them (``take``: the lease, the holder and the claim become its own, atomically,
so two instances never both take one), journals them in its own file and attempts them at
once. An owner that was only slow (a pause longer than the lease) learns at its next renewal
that another instance holds the delivery now and drops it: delivered at least once, twice at
worst, by the same event id. A settlement Redis did not hear about (an outage) is sent again
at the next renewal, before anyone could take the delivery.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from proxy.redisurl import redis_url, timeouts
from proxy.statewatch import StateWatch, is_state_error

PREFIX = "tollway:webhook:"
OWED = PREFIX + "owed"
HOLDER = PREFIX + "holder"
DUE = PREFIX + "due"
ATTEMPTS = PREFIX + "attempts"
TAKE_AT_ONCE = 100
"""Leases run out that one look takes at most (the rest at the next look)."""

_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1e6\n"

_CLAIM = (
    _NOW
    + """
-- KEYS: claim, owed, holder, due; ARGV: instance, keep, key, record, lease
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
redis.call('HSET', KEYS[3], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[5]), ARGV[3])
return 1
"""
)

_RENEW = (
    _NOW
    + """
-- KEYS: holder, due, attempts; ARGV: instance, lease, then key, attempts pairs
-- returns the keys another instance holds now
local lost = {}
for i = 3, #ARGV, 2 do
  local holder = redis.call('HGET', KEYS[1], ARGV[i])
  if holder == ARGV[1] then
    redis.call('ZADD', KEYS[2], 'XX', now + tonumber(ARGV[2]), ARGV[i])
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  elseif holder then
    table.insert(lost, ARGV[i])
  end
end
return lost
"""
)

_TAKE = (
    _NOW
    + """
-- KEYS: due, owed, holder, attempts; ARGV: instance, keep, lease, limit, claim prefix
-- returns key, record, attempts triples
local out = {}
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[4])
for _, k in ipairs(expired) do
  local rec = redis.call('HGET', KEYS[2], k)
  if rec then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), k)
    redis.call('HSET', KEYS[3], k, ARGV[1])
    redis.call('SET', ARGV[5] .. k, ARGV[1], 'EX', ARGV[2])
    table.insert(out, k)
    table.insert(out, rec)
    table.insert(out, redis.call('HGET', KEYS[4], k) or '0')
  else
    redis.call('ZREM', KEYS[1], k)
  end
end
return out
"""
)


class RedisClaims:
    """Claims of deliveries in Redis, one key each, expiring after ``keep`` seconds."""

    def __init__(
        self,
        url: str,
        instance: str,
        keep: float,
        watch: StateWatch | None,
        lease: float = 30.0,
    ) -> None:
        import redis.asyncio as aioredis  # only a Redis deployment loads redis-py

        self.client: Any = aioredis.from_url(redis_url(url), **timeouts(url))
        self.instance = instance
        self.keep = max(1, int(keep))
        self.lease = lease
        self.watch = watch
        self._claim = self.client.register_script(_CLAIM)
        self._renew = self.client.register_script(_RENEW)
        self._take = self.client.register_script(_TAKE)

    @property
    def reachable(self) -> bool:
        return self.watch is None or self.watch.available

    def _lost(self, exc: Exception) -> None:
        if not is_state_error(exc):
            raise exc
        if self.watch is not None:
            self.watch.failed(exc)

    async def claim(self, key: str, record: bytes) -> bool | None:
        """True: this instance delivers it (and holds its lease, ``record`` mirrored); False:
        another instance does; None: Redis is unreachable, ask again later."""
        if not self.reachable:
            return None
        args: list[Any] = [self.instance, self.keep, key, record, self.lease]
        try:
            won = await self._claim(keys=[PREFIX + key, OWED, HOLDER, DUE], args=args)
        except Exception as e:
            self._lost(e)
            return None
        return bool(won)

    async def renew(self, held: dict[str, int]) -> list[str]:
        """Renew the leases of ``held`` (key -> attempts so far); the keys another instance
        took meanwhile."""
        if not held:
            return []
        args: list[Any] = [self.instance, self.lease]
        for key, attempts in held.items():
            args += [key, attempts]
        lost = await self._renew(keys=[HOLDER, DUE, ATTEMPTS], args=args)
        return [k.decode() for k in lost]

    async def take(self) -> list[tuple[str, bytes, int]]:
        """Deliveries whose lease ran out (their holder died), now this instance's:
        ``(key, record, attempts)``."""
        args: list[Any] = [self.instance, self.keep, self.lease, TAKE_AT_ONCE, PREFIX]
        flat = await self._take(keys=[DUE, OWED, HOLDER, ATTEMPTS], args=args)
        return [(flat[i].decode(), flat[i + 1], int(flat[i + 2])) for i in range(0, len(flat), 3)]

    async def done(self, keys: list[str]) -> None:
        """Settled deliveries leave the shared outbox."""
        if not keys:
            return
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.zrem(DUE, *keys)
            pipe.hdel(OWED, *keys)
            pipe.hdel(HOLDER, *keys)
            pipe.hdel(ATTEMPTS, *keys)
            await pipe.execute()

    def failed(self, exc: Exception) -> None:
        """A call of the outbox's upkeep failed: an outage is the watch's to report."""
        self._lost(exc)

    async def reseed(
        self, held: Iterable[tuple[str, float]], owed: Iterable[tuple[str, bytes]] = ()
    ) -> None:
        """Put back the claims this instance holds: ``(key, when it was settled or claimed)``;
        a claim another instance holds meanwhile is left to it. ``owed``: the deliveries it
        holds and still owes, ``(key, record)``, mirrored again with a fresh lease (their
        mirror was lost with the rest); one another instance mirrored meanwhile is left to it."""
        now = time.time()
        async with self.client.pipeline(transaction=False) as pipe:
            n = 0
            for key, at in held:
                ttl = int(self.keep - (now - at))
                if ttl > 0:
                    pipe.set(PREFIX + key, self.instance, nx=True, ex=ttl)
                    n += 1
            for key, record in owed:
                pipe.hsetnx(OWED, key, record)
                pipe.hsetnx(HOLDER, key, self.instance)
                pipe.zadd(DUE, {key: now + self.lease}, nx=True)
                n += 1
            if n:
                await pipe.execute()

    async def close(self) -> None:
        await self.client.aclose()
