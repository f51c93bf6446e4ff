"""The health of the shared state (``state.url: redis://...``): outages and restarts.

Redis is often run without persistence, so it holds hot copies, never the only record: issued
keys and revocations live in every instance's ``keys.json``, monthly counts in each instance's
``quota.json`` (its own share). This watch notices when Redis has to be given those copies
back, without adding anything to a request's path:

* an outage is noticed by whoever hits it (a request's Redis call fails: ``failed``) or by the
  background check; until the check reaches Redis again, ``available`` is False and users of
  the state answer without it (``state.on_unavailable``: per-instance limits, or 503);
* a restart (or a flush) is noticed by the check: the sentinel key ``tollway:epoch`` holds a
  random value set by the first instance that finds it missing, so a changed or missing value
  means Redis lost its data. The scripts that decide (rate windows and monthly quota, budget
  reservations) are given the epoch this watch last saw and decide nothing when Redis holds
  another or none (one GET inside the script): the connection of a request may reach a
  restarted Redis before this check does, and must not decide on its empty counts. The caller
  answers as in an outage (``EpochChanged``, a state error) and the check runs at once;
* either way the registered ``on_recover`` callbacks re-seed Redis from the durable records
  before ``available`` turns True again;
* after a restart every instance puts back its own records at its next check, so for a while
  the shared counts lack the shares of the instances that have not checked yet (a monthly
  quota would hand them out again): each instance stays unavailable for ``settle`` seconds
  after it re-seeded (two check intervals and a check's timeout), re-seeding again at each
  check, and so decides alone or refuses meanwhile, as in an outage;
* likewise after an outage with ``on_unavailable: serve``: every instance decided alone
  meanwhile and puts what it counted (a quota's places, a budget's spending) back at its own
  next check, so each waits ``settle`` seconds before deciding on the shared counts again, and
  its first decision then sees every instance's outage. (With ``refuse`` nothing was decided
  alone: the shared counts are whole at once.)

The outage is logged once when it starts, then at most once per ``REPORT_EVERY`` seconds with
the number of affected requests, and once when it ends: never a line (or a traceback) per
request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from proxy import tasks
from proxy.context import StashKey
from proxy.errors import Reject
from proxy.redisurl import redis_url

log = logging.getLogger("tollway.state")

EPOCH_KEY = "tollway:epoch"
REPORT_EVERY = 10.0
"""Seconds between two log lines about one outage."""

_STATE_ERRORS: tuple[type[BaseException], ...] | None = None


class EpochChanged(Exception):
    """A call found the sentinel changed or missing: Redis lost its data (a restart, a flush)
    since this instance last checked, so what it holds must not decide anything before the
    watch has re-seeded it. ``seen`` is the epoch the call expected."""

    def __init__(self, seen: bytes) -> None:
        super().__init__("shared state lost its data (its epoch changed)")
        self.seen = seen


def claim_epoch(pipe: Any) -> None:
    """Queue the epoch rule first on ``pipe``, a transaction (``MULTI``) of a sync or an
    asyncio client: the sentinel gets a random value if it is missing (the first instance to
    find it so wins), then is read, so the transaction's second reply is the epoch. Every user
    of the epoch goes through here (this watch; the usage shipper, which must label its entries
    with the epoch they were added under, so it queues them in the same transaction), so all
    agree on what a restart is."""
    pipe.set(EPOCH_KEY, secrets.token_hex(8), nx=True)
    pipe.get(EPOCH_KEY)


def epoch_guard(answer: str) -> str:
    """The first lines of a script that decides on the shared counts: its last argument is
    the epoch the caller's watch last saw (empty: none known), and when the sentinel holds
    another or none (Redis lost its data since) it returns ``answer`` at once, before any
    write. One GET inside the script: nothing more on the wire."""
    return (
        "local epoch = ARGV[#ARGV]\n"
        f"if epoch ~= '' and redis.call('GET', '{EPOCH_KEY}') ~= epoch then return {answer} end\n"
    )


def is_state_error(exc: BaseException) -> bool:
    """Whether ``exc`` means the shared state cannot be reached (as opposed to a bug or a
    refused command): connection refused or reset, a timeout, Redis still loading its data."""
    global _STATE_ERRORS
    if _STATE_ERRORS is None:
        from redis import exceptions  # only a Redis deployment gets here

        # not OSError at large: a full disk or a bad path is not an unreachable Redis
        _STATE_ERRORS = (
            exceptions.ConnectionError,
            exceptions.TimeoutError,
            ConnectionError,
            EpochChanged,
        )
    return isinstance(exc, _STATE_ERRORS)


class StateWatch:
    """One per application; users report failures, the background check reports the rest."""

    def __init__(
        self, url: str, on_unavailable: str = "serve", check_interval: float = 1.0
    ) -> None:
        import redis.asyncio as aioredis  # only a Redis deployment loads redis-py

        self.interval = check_interval
        timeout = max(0.5, min(check_interval, 5.0))  # a dead host must not stall the check
        # after a restart: until every other instance (checking as often) has re-seeded
        self.settle = 2 * check_interval + timeout
        self._settle_until = 0.0
        self._lost_data = False
        self._reached = True  # Redis answered a check since the last outage began
        self.client: Any = aioredis.from_url(
            redis_url(url), socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self.refuse = on_unavailable == "refuse"
        self.available = True
        self.epoch: bytes | None = None
        self.outages = 0
        self.reseeds = 0
        self._recover: list[Callable[[], Awaitable[object]]] = []
        self._affected = 0  # requests answered without the shared state since the last line
        self._total_affected = 0
        self._down_since = 0.0
        self._reported = 0.0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # a call failed (or found the epoch changed): check now

    def on_recover(self, fn: Callable[[], Awaitable[object]]) -> None:
        """Run ``fn`` after an outage or a restart, before the state counts as available."""
        self._recover.append(fn)

    # ---- called by users of the state (cheap: no I/O) ----------------------------------

    def failed(self, exc: BaseException) -> None:
        """A call to the shared state failed with a state error: the outage starts now, and
        the check runs at once (Redis may be back already, restarted: the sooner it is
        re-seeded the better). A changed epoch (``EpochChanged``) wakes the check every time,
        unless the check has re-seeded since the call was sent (the call's epoch is not the
        watch's)."""
        if isinstance(exc, EpochChanged):
            if exc.seen != self.epoch:
                return
            self._wake.set()
        if not self.available:
            return
        self._wake.set()
        self.available = False
        self._reached = False
        self.outages += 1
        self._down_since = self._reported = time.monotonic()
        log.warning(
            "%s; %s until it is back",
            "shared state (state.url) lost its data (restart or flush), re-seeding it"
            if isinstance(exc, EpochChanged)
            else f"shared state (state.url) unreachable ({type(exc).__name__})",
            "refusing requests that need it with 503"
            if self.refuse
            else "each instance enforces limits and quotas alone",
        )

    def affected(self) -> None:
        """One request was answered without the shared state (counted for the log)."""
        self._affected += 1

    def reject(self) -> Reject:
        """The answer to a request that needs the shared state while it is unreachable."""
        self._affected += 1
        return Reject(
            503,
            "the gateway's shared state is unreachable; retry shortly",
            code="state_unavailable",
            headers={"Retry-After": str(max(1, round(self.interval)))},
        )

    # ---- the background check ------------------------------------------------------------

    async def start(self) -> None:
        """Read the epoch once (a failure only starts an outage), then check periodically."""
        try:
            self.epoch = await self._read_epoch()
        except Exception as e:
            if not is_state_error(e):
                raise
            self.failed(e)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _read_epoch(self) -> bytes:
        """The sentinel's value; set (once, by whoever comes first) when it is missing."""
        async with self.client.pipeline(transaction=True) as pipe:
            claim_epoch(pipe)
            replies = await pipe.execute()
        return bytes(replies[1] or b"")

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # woken early by a failed call
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in a callback must not end the watch
                log.exception("shared state check failed")

    async def check(self) -> None:
        """One check: notice an outage, its end, or a restart; re-seed when needed."""
        try:
            epoch = await self._read_epoch()
        except Exception as e:
            if not is_state_error(e):
                raise
            self.failed(e)
            self._report()
            return
        restarted = self.epoch is not None and epoch != self.epoch
        if restarted:
            self._settle_until = time.monotonic() + self.settle
            self._lost_data = True
        elif not self._reached and not self.refuse:
            # back after an outage: the other instances decided alone too (serve), and put
            # what they counted meanwhile back only at their next check
            self._settle_until = time.monotonic() + self.settle
        self._reached = True
        if self.available and not restarted:
            return
        try:
            for fn in self._recover:
                await fn()
        except Exception as e:
            if not is_state_error(e):
                raise
            self.failed(e)  # lost again while re-seeding: the next check retries
            self._report()
            return
        self.epoch = epoch
        self.reseeds += 1
        if time.monotonic() < self._settle_until:  # the others may not have re-seeded yet
            if self.available:  # the restart was noticed here, not through an outage
                self.available = False
                self.outages += 1
                self._down_since = self._reported = time.monotonic()
                log.warning(
                    "shared state lost its data (restart or flush); re-seeded it, and %s for "
                    "%.1fs while the other instances re-seed theirs",
                    "refusing requests that need it with 503"
                    if self.refuse
                    else "each instance enforces limits and quotas alone",
                    self.settle,
                )
            return
        if not self.available:
            self.available = True
            total = self._total_affected + self._affected
            log.warning(
                "shared state reachable again after %.1fs (%d requests answered without it)%s; "
                "re-seeded from this instance's records",
                time.monotonic() - self._down_since,
                total,
                ", and it had lost its data" if self._lost_data else "",
            )
            self._affected = self._total_affected = 0
        self._lost_data = False

    def _report(self) -> None:
        now = time.monotonic()
        if now - self._reported < REPORT_EVERY:
            return
        self._reported = now
        log.warning(
            "shared state still unreachable after %.0fs (%d requests answered without it "
            "since the last report)",
            now - self._down_since,
            self._affected,
        )
        self._total_affected += self._affected
        self._affected = 0

    async def pause(self) -> None:
        """Stop checking: when a shutdown begins, before the users of the state close their
        clients (a check re-seeding through a closed client opens a connection nobody
        closes)."""
        # cancelled again if a cancellation is lost in redis-py (proxy.tasks)
        await tasks.stop(self._task, "the shared state check")
        self._task = None

    async def stop(self) -> None:
        await self.pause()
        with contextlib.suppress(Exception):
            await self.client.aclose()


STATE_WATCH: StashKey[StateWatch] = StashKey()
"""Where ``proxy.resources.Resources`` keeps the application's watch (absent without Redis)."""
