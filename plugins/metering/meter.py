"""The ``tollway meter`` server: the one process that owns the usage database when gateways
run as many instances (``metering.sink: redis``; see ``plugins.metering.stream``).

It consumes the usage stream into DuckDB in a thread of its own and serves the usage part of
the admin API (``/admin/sql``, ``/admin/invoices/{user}``, ``/admin/export``, behind the same
admin key, with the core's own handlers), so ``tollway sql --url http://METER`` and invoices
work as with one gateway. Its invoices bill the tiers' prices, quotas and overage terms of its
``--policy`` (the gateways' policy), which it also records in the database, so an invoice is
the same from a gateway, from the meter, or from ``tollway invoice --db`` on the meter's file.
It serves Prometheus ``GET /metrics`` too (``plugins.metering.meter_metrics``), and the
dashboard (``GET /dashboard``, the gateways' page): with sink redis the gateways keep no usage
database, so the history, money and top tables are the meter's, computed from its database by
the metering plugin's own figures code (``plugins.metering.figures``, cached the same way).
Imported only when the command runs (``plugins.metering.cli``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Mapping
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from plugins.metering.analytics import Analytics
from plugins.metering.billing import PlanTerms, plan_terms
from plugins.metering.figures import Dashboard
from plugins.metering.meter_metrics import meter_metrics
from plugins.metering.plugin import MeteringConfig
from plugins.metering.stream import Meter
from proxy import admin, dashboard
from proxy.analytics import ANALYTICS, FRESH_AS_OF, export_target
from proxy.app import metrics
from proxy.appkeys import GATEWAY, METRICS, RESOURCES
from proxy.chain import Chain
from proxy.cli.runner import start_site
from proxy.figures import Card, Figures
from proxy.gateway import Gateway
from proxy.keystore import KeyStore
from proxy.metrics import Metrics
from proxy.policy import LoadedPolicy
from proxy.resources import Resources
from proxy.runtime import Runtime
from proxy.statewatch import is_state_error

log = logging.getLogger("tollway.meter")


class MeterBackend:
    """The admin API's analytics interface (``proxy.analytics.AnalyticsBackend``) over the meter's
    database; a query first takes in what the stream holds, as a gateway loads its spool.
    Queries, invoices and exports run with the gateway's limits (``plugins.metering.analytics``)."""

    def __init__(
        self,
        meter: Meter,
        tier_costs: dict[str, float],
        analytics: Analytics,
        terms: Mapping[str, PlanTerms],
    ) -> None:
        self.meter = meter
        self.db = meter.db
        self.tier_costs = tier_costs
        self.terms = terms  # the tiers' quotas and overage prices: the gateways' invoice terms
        self.analytics = analytics

    async def sql(self, query: str) -> tuple[list[str], list[list[Any]]]:
        self.analytics.check_capacity()
        FRESH_AS_OF.set(await asyncio.to_thread(self.meter.drain))
        return await self.analytics.sql(query)

    async def invoice(self, user: str, month: str) -> dict[str, Any]:
        await asyncio.to_thread(self.meter.drain)
        return await self.analytics.invoice(user, month, self.tier_costs, None, self.terms)

    async def export_parquet(self, folder: str) -> tuple[str, int]:
        export_target(self.analytics.export_dir, folder)  # a bad name is refused first
        await asyncio.to_thread(self.meter.drain)
        return await self.analytics.export_parquet(folder)


def build_meter_app(loaded: LoadedPolicy, name: str | None = None) -> tuple[web.Application, Meter]:
    """The meter's web app and its consumer, from a policy whose metering plugin has sink redis."""
    policy = loaded.policy
    items = [c for c in policy.chain if c.name == "metering" and c.enabled]
    if not items:
        raise ValueError("the policy's chain has no metering plugin")
    config = MeteringConfig.model_validate(items[0].config)
    if not policy.state.distributed:
        raise ValueError("tollway meter reads the usage stream of state.url: redis://...")
    meter = Meter(config.open_database(), policy.state.url, name)
    tier_costs = policy.tier_costs()
    terms = plan_terms(policy.tiers)  # overage on invoices, as the gateway bills it
    meter.db.set_tier_prices(tier_costs, policy.tiers_with("sla_guarantee"), terms)
    # the admin handlers, with a gateway that has no chain: same key check, same answers
    gw = Gateway(Runtime.build(loaded, Chain(loaded=loaded, plugins=(), names=())), KeyStore())
    app = web.Application()
    app[GATEWAY] = gw
    app[RESOURCES] = resources = Resources()
    analytics = Analytics(meter.db, config.query_limits(), config.export_dir)
    resources.put(ANALYTICS, MeterBackend(meter, tier_costs, analytics, terms))
    app.router.add_post("/admin/sql", admin.run_sql)
    app.router.add_get("/admin/invoices/{user}", admin.get_invoice)
    app.router.add_post("/admin/export", admin.export)
    source = MeterUsage(meter, analytics)
    app.router.add_get(
        "/admin/stats", admin.admin_only(partial(_stats, meter, source, Dashboard()))
    )
    app.router.add_get("/dashboard", dashboard.page)
    app.router.add_get("/healthz", _ok)
    # Prometheus, without a key as on a gateway: the meter's own figures, no request counters
    app[METRICS] = registry = Metrics(core=False)
    registry.add("meter", partial(meter_metrics, meter, analytics))
    app.router.add_get("/metrics", metrics)
    return app, meter


_STREAM_FIGURES = ("stream_entries", "oldest_unloaded_age_s", "gateways_shipping", "fresh_as_of")
"""What ``Meter.freshness`` reads from Redis: null in ``/admin/stats`` while it is unreachable."""


class MeterUsage:
    """The meter's database as the dashboard figures' source (``figures.UsageSource``): what
    the stream holds is loaded first, as a gateway loads its spool; without Redis the figures
    are those of what is loaded (the page still shows the history, the outage is in ``redis``)."""

    def __init__(self, meter: Meter, analytics: Analytics) -> None:
        self.meter = meter
        self.analytics = analytics

    async def flush(self) -> None:
        if not self.meter.outage.available:  # no connection attempt per poll during an outage
            return
        try:
            await asyncio.to_thread(self.meter.drain)
        except Exception as e:
            if not is_state_error(e):
                raise


async def _stats(
    meter: Meter, source: MeterUsage, figures_cache: Dashboard, request: web.Request
) -> web.Response:
    """How fresh the meter's answers are (``Meter.freshness``), what it loaded, and whether it
    reaches Redis. During an outage the consumer's last attempt answers (not another connection
    attempt per poll): ``redis: unavailable`` and for how long, the stream's figures null.
    With them, for the dashboard page: three cards of the meter's own (Redis, rows loaded,
    entries waiting) and the metering plugin's figures (cards, tables, charts and the ``usage``
    section) from the meter's database, computed at most once per ``CACHE_SECONDS``."""
    figures: dict[str, Any] = dict.fromkeys(_STREAM_FIGURES)
    reachable = meter.outage.available
    if reachable:
        try:
            figures = await asyncio.to_thread(meter.freshness)
        except Exception as e:
            if not is_state_error(e):
                raise
            reachable = False  # lost since the consumer's last step; it notices and logs it
    body = {
        "time": time.time(),
        "redis": "available" if reachable else "unavailable",
        "redis_unavailable_s": None if reachable else meter.outage.down_for() or 0.0,
        **figures,
        "loaded_rows": meter.loaded_rows,
    }
    own = Figures(
        cards=(
            Card("meter_redis", "Redis (usage stream)", body["redis"], "text"),
            Card("meter_loaded_rows", "rows loaded by the meter", meter.loaded_rows),
            Card("meter_stream_entries", "stream entries waiting", body["stream_entries"]),
        )
    )
    dashboard.add_figures(body, [own, await figures_cache.figures(source)])
    return web.Response(body=orjson.dumps(body, default=str), content_type="application/json")


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def consume(meter: Meter, stop: threading.Event) -> None:
    """The consumer loop (a thread: the Redis reads block). Redis unreachable, also when the
    meter started without it: retried with a backoff, the outage logged by ``meter.outage``
    (``plugins.metering.outage``: a line per ``REPORT_EVERY`` seconds, no traceback); once it is
    back the first step makes the consumer group and loads the stream. Any other error is
    logged with its traceback and retried a second later (its entries stay pending)."""
    while not stop.is_set():
        try:
            meter.step(block_ms=500)
            meter.measure()  # the backlog /metrics reports
        except Exception as e:
            if is_state_error(e):
                stop.wait(meter.outage.failed(e))  # set by a shutdown: returns at once
                continue
            log.exception("loading usage entries failed; they stay pending and are retried")
            stop.wait(1.0)
        else:
            meter.outage.reached()


async def run_meter(loaded: LoadedPolicy, host: str, port: int, name: str | None) -> None:
    """Serve until SIGINT or SIGTERM, then load what arrived meanwhile and close."""
    app, meter = build_meter_app(loaded, name)
    stop = threading.Event()
    thread = threading.Thread(target=consume, args=(meter, stop), name="tollway-meter")
    thread.start()
    runner, bound = await start_site(app, host, port)
    print(f"tollway meter listening on http://{host}:{bound}", flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, done.set)
    backend = app[RESOURCES].find(ANALYTICS)
    assert isinstance(backend, MeterBackend)
    analytics = backend.analytics
    try:
        await done.wait()
    finally:
        analytics.stop_all()  # running queries answer at once: cleanup need not wait
        await runner.cleanup()
        await analytics.close()
        stop.set()
        await asyncio.to_thread(thread.join)
        _last_drain(meter)
        meter.close()
        if not analytics.busy:
            meter.db.close()


def _last_drain(meter: Meter) -> None:
    """Load what arrived meanwhile before the database closes. Without Redis (down since the
    consumer's last attempt, or lost now) the stream keeps it for the next start: a shutdown
    neither waits for Redis nor fails for it."""
    if not meter.outage.available:
        log.info("stopping without Redis; the usage stream is loaded at the next start")
        return
    try:
        meter.drain()
    except Exception as e:
        if not is_state_error(e):
            raise
        log.warning(
            "Redis unreachable at shutdown (%s); the usage stream is loaded at the next start",
            type(e).__name__,
        )
