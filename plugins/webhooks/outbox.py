"""The outbox: events in, signed POSTs out, each once, retried with backoff, off the request path.

``offer`` is the event bus's subscriber: it runs on the request path, so it only appends the
event to an in-memory inbox and wakes the worker (no I/O, no await). The worker, one task per
application, takes the inbox in batches: each event becomes one delivery per endpoint that
wants its kind, unless that delivery is already known (owed or settled: the journal), is
written to the journal and fsynced, then claimed (with Redis state) and attempted. A failure
(a network error, a timeout, any answer but 2xx) is attempted again after a backoff that doubles
from ``backoff.initial`` up to ``backoff.max``, drawn between half and all of it (jitter, so
receivers coming back are not hit by every gateway at once); a 429 or 503 with ``Retry-After``
is attempted again after that long. After ``max_attempts`` the delivery is given up (settled as
``failed``, logged, counted). At most ``concurrency`` attempts are in flight: a receiver that
hangs holds those slots up to its ``timeout``, never a client request.

The outbox outlives a policy reload (``proxy.resources``): the new chain's plugin gives it its
new endpoints, and what is owed carries over (an endpoint keyed by its URL, so a changed secret
signs the next attempt). A delivery whose endpoint a reload removed stays owed in the file and is
attempted if the endpoint comes back.

With Redis state (``state.url``) the claim mirrors each delivery into a shared outbox in Redis,
leased to its holder (``plugins.webhooks.claims``): the upkeep task renews this instance's
leases every third of ``lease``, removes what it settled, and takes over the deliveries whose
lease ran out because their holder died, so what a dead instance owed is delivered by a live
one, attempted at once and then on the same backoff, its attempts counted on from the dead
instance's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import itertools
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson

from plugins.webhooks.claims import RedisClaims
from plugins.webhooks.config import Endpoint, WebhooksConfig
from plugins.webhooks.journal import Journal, Owed
from plugins.webhooks.signing import EVENT_ID_HEADER, SIGNATURE_HEADER, sign
from proxy import tasks
from proxy.events import Event

log = logging.getLogger("tollway.webhooks")

INBOX_MAX = 100_000
"""Events waiting for the worker before new ones are dropped (counted): a bound on memory if
the worker is stuck (a disk that hangs on fsync)."""

CLOSE_GRACE = 1.0
"""Seconds an attempt in flight at shutdown gets to finish; then it is cancelled and stays owed
(the next start attempts it again: a receiver may see it twice, by the same event id)."""


def event_id(dedupe: str) -> str:
    """The event's id, the same on every instance that notices the occurrence."""
    return "evt_" + hashlib.sha256(dedupe.encode()).hexdigest()[:24]


def payload(event: Event) -> dict[str, Any]:
    """What the receiver gets: ``{id, kind, subject, data, created_at}``."""
    created = datetime.fromtimestamp(event.at, UTC).isoformat(timespec="milliseconds")
    return {
        "id": event_id(event.dedupe),
        "kind": event.kind,
        "subject": event.subject,
        "data": event.data,
        "created_at": created.replace("+00:00", "Z"),
    }


def record(owed: Owed) -> bytes:
    """A delivery as the shared outbox in Redis holds it (what another instance needs to
    take it over)."""
    return orjson.dumps({"ep": owed.endpoint, "event": owed.event, "at": owed.at})


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a ``Retry-After`` header (delta seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None


@dataclass(slots=True)
class Delivery:
    """One owed delivery as the worker schedules it."""

    owed: Owed
    body: bytes
    attempts: int = 0
    claimed: bool = False


@dataclass(slots=True)
class EndpointStats:
    delivered: int = 0
    failed: int = 0
    last_status: int | None = None
    last_error: str | None = None
    last_attempt_at: float | None = None


@dataclass
class Counters:
    queued: int = 0
    delivered: int = 0
    failed: int = 0
    retries: int = 0
    duplicates: int = 0
    dropped: int = 0
    taken_over: int = 0
    per_endpoint: dict[str, EndpointStats] = field(default_factory=dict)


class Outbox:
    """Owed deliveries of one application: the journal, the claims, the worker."""

    def __init__(
        self, config: WebhooksConfig, journal: Journal, claims: RedisClaims | None = None
    ) -> None:
        self.journal = journal
        self.claims = claims
        self.counters = Counters()
        self._inbox: list[Event] = []
        self._wake = asyncio.Event()
        self._due: list[tuple[float, int, str]] = []  # (loop time, tie-break, key)
        self._seq = itertools.count()
        self._deliveries: dict[str, Delivery] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._upkeep_task: asyncio.Task[None] | None = None
        self._done: set[str] = set()
        """Keys settled here whose mirror in Redis is still to be removed."""
        self._session: aiohttp.ClientSession | None = None
        self.configure(config)

    # ---- configuration -----------------------------------------------------------------

    def configure(self, config: WebhooksConfig) -> None:
        """Take a (re)loaded policy's endpoints and settings; what is owed to an endpoint
        that is now configured is scheduled."""
        self.config = config
        self.endpoints: dict[str, Endpoint] = {e.key: e for e in config.endpoints}
        self._wants: dict[str, tuple[Endpoint, ...]] = {}
        for key in self.endpoints:
            self.counters.per_endpoint.setdefault(key, EndpointStats())
        if self._task is not None:
            self._schedule_owed()

    def _targets(self, kind: str) -> tuple[Endpoint, ...]:
        targets = self._wants.get(kind)
        if targets is None:
            targets = self._wants[kind] = tuple(e for e in self.endpoints.values() if e.wants(kind))
        return targets

    # ---- the request path ------------------------------------------------------------

    def offer(self, event: Event) -> None:
        """The bus's subscriber: queue in memory and wake the worker; never blocks."""
        if not self._targets(event.kind):
            return
        if len(self._inbox) >= INBOX_MAX:
            self.counters.dropped += 1
            return
        self._inbox.append(event)
        self._wake.set()

    # ---- the worker --------------------------------------------------------------------

    async def start(self) -> None:
        """Replay the journal, put back this instance's claims, start the worker (once)."""
        if self._task is not None:
            return
        await asyncio.to_thread(self.journal.load)
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": "tollway-webhooks"}, auto_decompress=False
        )
        if self.claims is not None:
            with contextlib.suppress(Exception):  # unreachable: the watch re-seeds later
                await self.reseed()
        self._task = asyncio.get_running_loop().create_task(self._run())
        if self.claims is not None:
            self._upkeep_task = asyncio.get_running_loop().create_task(self._upkeep())
        self._schedule_owed()

    async def reseed(self) -> None:
        """Put this instance's claims back into Redis (``on_recover``, and at start)."""
        if self.claims is None:
            return
        held = [(k, at) for k, (at, how) in self.journal.settled.items() if how != "duplicate"]
        mine = [(k, d) for k, d in self._deliveries.items() if d.claimed]
        held += [(k, time.time()) for k, _ in mine]
        await self.claims.reseed(held, [(k, record(d.owed)) for k, d in mine])

    async def _upkeep(self) -> None:
        """Distributed state only: every third of ``lease``, tell Redis what was settled,
        renew the leases of what this instance holds, take over what a dead one held."""
        assert self.claims is not None
        claims = self.claims
        while True:
            await asyncio.sleep(claims.lease / 3)
            if not claims.reachable:
                continue  # nobody can take anything meanwhile; the watch reports the outage
            try:
                await self._keep_up(claims)
            except Exception as e:
                try:
                    claims.failed(e)
                except Exception:
                    log.exception("webhooks: the shared outbox's upkeep failed")

    async def _keep_up(self, claims: RedisClaims) -> None:
        if self._done:
            done = list(self._done)
            await claims.done(done)
            self._done.difference_update(done)
        held = {k: d.attempts for k, d in self._deliveries.items() if d.claimed}
        for key in await claims.renew(held):
            # another instance took it (this one was too slow to renew): its delivery now
            if self._deliveries.pop(key, None) is not None:
                self.counters.duplicates += 1
                self.journal.settle(key, "duplicate")
                self._wake.set()
        now = asyncio.get_running_loop().time()
        for key, rec, attempts in await claims.take():
            if key in self._deliveries:  # this instance's own lease, taken back
                continue
            data = orjson.loads(rec)
            owed = Owed(key, data["ep"], data["event"], float(data["at"]))
            self.journal.queue(owed)
            self.counters.taken_over += 1
            log.info("webhooks: took over a delivery of %s", data["event"]["kind"])
            self._deliveries[key] = Delivery(owed, orjson.dumps(owed.event), attempts, True)
            self._push(now, key)

    def _schedule_owed(self) -> None:
        now = asyncio.get_running_loop().time()
        for key, owed in self.journal.owed.items():
            if key not in self._deliveries and owed.endpoint in self.endpoints:
                self._deliveries[key] = Delivery(owed, orjson.dumps(owed.event))
                self._push(now, key)
        self._wake.set()

    def _push(self, when: float, key: str) -> None:
        heapq.heappush(self._due, (when, next(self._seq), key))
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            timeout: float | None = None
            if self._due and len(self._running) < self.config.concurrency:
                timeout = max(0.0, self._due[0][0] - loop.time())
            if timeout != 0.0:  # not wait_for: on 3.11 it can swallow a cancel (proxy.tasks)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
            self._wake.clear()
            try:
                if self._inbox:
                    self._intake()
                await self.journal.sync()  # queued before attempted; settled lines too
            except Exception:  # a full disk: the worker goes on, the lines are kept
                log.exception("webhooks: cannot write the queue file; retrying")
                await asyncio.sleep(1.0)
                continue
            now = loop.time()
            while self._due and self._due[0][0] <= now:
                if len(self._running) >= self.config.concurrency:
                    break
                _, _, key = heapq.heappop(self._due)
                delivery = self._deliveries.get(key)
                if delivery is None:
                    continue
                task = loop.create_task(self._attempt(delivery))
                self._running.add(task)
                task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("webhooks: a delivery attempt failed", exc_info=task.exception())
        self._wake.set()

    def _intake(self) -> None:
        """Each event of the inbox -> one owed delivery per endpoint, unless already known."""
        events, self._inbox = self._inbox, []
        now = asyncio.get_running_loop().time()
        for event in events:
            body = payload(event)
            for endpoint in self._targets(event.kind):
                key = f"{body['id']}/{endpoint.key}"
                if self.journal.known(key):
                    self.counters.duplicates += 1
                    continue
                owed = Owed(key, endpoint.key, body, event.at)
                self.journal.queue(owed)
                self.counters.queued += 1
                self._deliveries[key] = Delivery(owed, orjson.dumps(body))
                heapq.heappush(self._due, (now, next(self._seq), key))

    def _settle(self, delivery: Delivery, how: str) -> None:
        key = delivery.owed.key
        self._deliveries.pop(key, None)
        if delivery.claimed:
            self._done.add(key)
        self.journal.settle(key, how)
        self._wake.set()  # the worker writes the line

    def _backoff(self, attempts: int) -> float:
        b = self.config.backoff
        wait = min(b.max, b.initial * 2 ** max(0, attempts - 1))
        return wait * random.uniform(0.5, 1.0)

    async def _attempt(self, delivery: Delivery) -> None:
        loop = asyncio.get_running_loop()
        endpoint = self.endpoints.get(delivery.owed.endpoint)
        if endpoint is None:  # removed by a reload: stays owed, scheduled if it comes back
            self._deliveries.pop(delivery.owed.key, None)
            return
        if self.claims is not None and not delivery.claimed:
            won = await self.claims.claim(delivery.owed.key, record(delivery.owed))
            if won is None:  # Redis unreachable: not an attempt, ask again later
                self._push(loop.time() + self._backoff(1), delivery.owed.key)
                return
            if not won:
                self.counters.duplicates += 1
                self._settle(delivery, "duplicate")
                return
            delivery.claimed = True
        delivery.attempts += 1
        if delivery.attempts > 1:
            self.counters.retries += 1
        status, wait, error = await self._post(endpoint, delivery)
        stats = self.counters.per_endpoint.setdefault(endpoint.key, EndpointStats())
        stats.last_status, stats.last_error, stats.last_attempt_at = status, error, time.time()
        if status is not None and 200 <= status < 300:
            stats.delivered += 1
            self.counters.delivered += 1
            self._settle(delivery, "delivered")
            return
        what = f"status {status}" if status is not None else error
        if delivery.attempts >= self.config.max_attempts:
            stats.failed += 1
            self.counters.failed += 1
            log.warning(
                "webhooks: %s event to %s given up after %d attempts (%s)",
                delivery.owed.event["kind"],
                endpoint.shown,
                delivery.attempts,
                what,
            )
            self._settle(delivery, "failed")
            return
        delay = wait if wait is not None else self._backoff(delivery.attempts)
        delay = min(delay, max(self.config.backoff.max, 1.0))
        log.info(
            "webhooks: delivery to %s failed (%s); attempt %d of %d in %.1fs",
            endpoint.shown,
            what,
            delivery.attempts + 1,
            self.config.max_attempts,
            delay,
        )
        self._push(loop.time() + delay, delivery.owed.key)

    async def _post(
        self, endpoint: Endpoint, delivery: Delivery
    ) -> tuple[int | None, float | None, str | None]:
        """One attempt: (status or None, seconds a Retry-After asks for, what went wrong)."""
        assert self._session is not None
        body = delivery.body
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(
                endpoint.secret.get_secret_value().encode(), body, int(time.time())
            ),
            EVENT_ID_HEADER: delivery.owed.event["id"],
            "Tollway-Event-Kind": delivery.owed.event["kind"],
            "Tollway-Delivery-Attempt": str(delivery.attempts),
        }
        try:
            async with self._session.post(
                endpoint.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=endpoint.timeout),
                allow_redirects=False,  # a signed event goes where it was configured to
            ) as r:
                await r.content.read(65536)  # the answer is not used; read a little, then drop
                wait = None
                if r.status in (429, 503):
                    wait = retry_after(r.headers.get("Retry-After"), time.time())
                return r.status, wait, None
        except TimeoutError:
            return None, None, f"no answer within {endpoint.timeout:g}s"
        except (aiohttp.ClientError, OSError) as e:
            return None, None, type(e).__name__

    async def close(self) -> None:
        """Stop the worker; attempts in flight get ``CLOSE_GRACE`` seconds; write the rest."""
        await tasks.stop(self._task, "the webhooks worker")
        self._task = None
        await tasks.stop(self._upkeep_task, "the webhooks upkeep")
        self._upkeep_task = None
        if self._running:
            _, late = await asyncio.wait(set(self._running), timeout=CLOSE_GRACE)
            for task in late:  # a claim talks to Redis: its cancel may need repeating
                with contextlib.suppress(Exception):
                    await tasks.stop(task, "a webhook delivery")
        self._intake_at_close()
        await self.journal.sync()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self.claims is not None:
            if self._done and self.claims.reachable:  # else another instance delivers again
                with contextlib.suppress(Exception):
                    await self.claims.done(list(self._done))
            await self.claims.close()

    def _intake_at_close(self) -> None:
        """Events offered since the worker last ran are written as owed (the next start
        delivers them)."""
        if self._inbox:
            self._intake()

    # ---- what /admin/stats and /metrics show --------------------------------------------

    @property
    def pending(self) -> int:
        return len(self.journal.owed)

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "pending": self.pending,
            "queued": c.queued,
            "delivered": c.delivered,
            "failed": c.failed,
            "retries": c.retries,
            "duplicates": c.duplicates,
            "dropped": c.dropped,
            "taken_over": c.taken_over,
            "endpoints": [
                {
                    "url": e.shown,
                    "kinds": list(e.kinds),
                    "pending": sum(1 for o in self.journal.owed.values() if o.endpoint == key),
                    "delivered": c.per_endpoint[key].delivered,
                    "failed": c.per_endpoint[key].failed,
                    "last_status": c.per_endpoint[key].last_status,
                    "last_error": c.per_endpoint[key].last_error,
                }
                for key, e in self.endpoints.items()
            ],
        }

    def metrics(self) -> dict[str, tuple[str, str, Any, tuple[str, ...]]]:
        c = self.counters
        return {
            "tollway_webhook_pending": (
                "gauge",
                "Webhook deliveries owed (queued, not yet delivered or given up).",
                self.pending,
                (),
            ),
            "tollway_webhook_queued": (
                "counter",
                "Webhook deliveries queued (one per event and endpoint).",
                c.queued,
                (),
            ),
            "tollway_webhook_delivered": (
                "counter",
                "Webhook deliveries the receiver accepted (2xx).",
                c.delivered,
                (),
            ),
            "tollway_webhook_failed": (
                "counter",
                "Webhook deliveries given up after max_attempts.",
                c.failed,
                (),
            ),
            "tollway_webhook_retries": (
                "counter",
                "Webhook attempts after the first of a delivery.",
                c.retries,
                (),
            ),
            "tollway_webhook_duplicates": (
                "counter",
                "Events not delivered again: already delivered, owed, or claimed by another "
                "instance.",
                c.duplicates,
                (),
            ),
            "tollway_webhook_taken_over": (
                "counter",
                "Webhook deliveries taken over from an instance that stopped renewing their "
                "lease (with state.url).",
                c.taken_over,
                (),
            ),
        }
