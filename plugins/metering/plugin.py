"""metering: one usage row per request into DuckDB, written off the hot path, never lost.

Per request the plugin builds one small dict and appends it to the spool (``plugins.metering.spool``)
in ``response_complete``, before the reply's last bytes (a whole body, an error, a stream's
terminal event) are sent, and in ``log`` for what never completed (an abandoned or failed
stream). A background task rotates the spool every ``flush_interval`` (5 s) or ``batch_rows``
rows (20,000) and a worker thread loads the closed segments into DuckDB. ``/admin/sql`` and
invoices load everything pending first, so they see every answered request.

Billing rules (written here because invoices depend on them):
- ``cost_usd`` = input_tokens x input price + output_tokens x output price (per million, from
  ``models:``); NULL when the model has no price (counted in ``unpriced_requests``), 0 for a
  cache hit or a coalesced follower (``saved_usd`` is what its own provider call would have
  cost). A batched embeddings request costs its share of the usage.
- ``price_usd`` = the feature's ``price_per_request`` (a tier's ``prices`` override it) for
  every request answered with status < 400, cache hits included; 0 otherwise.
- A stream the client abandons is billed for what was delivered: the provider's token counts
  where it sent them, else output tokens = content events relayed (about one token each) and
  input tokens = prompt bytes / 4; such rows have ``usage_estimated = true``.
- A stream that broke after it started (the provider's connection broke or timed out, it sent
  an error or a malformed event, or it stopped before its terminal event) is a failed request:
  its row has ``error_code = 'upstream_stream_error'`` and the failure's ``status`` (502, or 504
  for a timeout), though the client first got a 200; ``price_usd`` is 0 (the customer did not
  get the reply, and the request is given back to the monthly quota), while ``cost_usd`` keeps
  what the provider may charge for the tokens it produced: its counts where they arrived, else
  the same estimate as for an abandoned stream (``usage_estimated = true``). Complete streams
  are ``status < 400``; broken ones ``WHERE error_code = 'upstream_stream_error'``.
- A request to an endpoint of ``proxy.context.UNBILLED_ENDPOINTS`` (``count_tokens``,
  ``input_tokens``) costs
  nothing at the provider and is not sold: its row has ``cost_usd`` and ``price_usd`` 0 (the
  row's per-token prices are 0, so even a model without a price is not "unpriced") and the
  count as ``input_tokens``; a gateway estimate (no provider count) has ``usage_estimated =
  true``. Invoices show such requests as a zero line (quantity N, unit price 0), so a customer
  sees the calls made, and the monthly quota never counted them.
- ``labels`` are the labels of the API key (``Principal.attrs["labels"]``; NULL without).
- ``upstream_request_id`` is the provider's id of the call that answered (NULL for a cache hit,
  an estimate or a refusal), for taking a customer's ticket (``X-Request-Id``) to the provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from plugins.metering import account
from plugins.metering.analytics import Analytics, QueryLimits
from plugins.metering.billing import PlanTerms, plan_terms
from plugins.metering.figures import Dashboard
from plugins.metering.ip_hash import IpHasher, key_file, load_or_create_key
from plugins.metering.spool import Spool
from plugins.metering.stream import StreamShipper
from proxy.analytics import ANALYTICS, FRESH_AS_OF, export_target
from proxy.appkeys import KEYSTORE, METRICS, RESOURCES
from proxy.context import UNBILLED_ENDPOINTS, RequestContext, StashKey
from proxy.hookspecs import hookimpl
from proxy.policy import Policy, parse_duration, policy_of
from proxy.pricing import billed_tokens, request_price
from proxy.statewatch import is_state_error

if TYPE_CHECKING:
    import argparse

    from plugins.metering.database import UsageDB
    from proxy.context import Principal
    from proxy.figures import Figures

log = logging.getLogger("tollway.metering")

_STORE: StashKey[UsageStore] = StashKey()
_WRITTEN: StashKey[bool] = StashKey()


class MeteringConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    database: str = Field("data/usage.duckdb", description="The DuckDB file (one process owns it).")
    spool_dir: str | None = Field(
        None, description="Folder of the crash-safe spool (default: DATABASE.spool)."
    )
    # Loads have a fixed cost (~30 ms with the rollups' statements), so larger batches are
    # cheaper per row (bench/writer.py: 31 ms for 250 rows, 48 ms for 5,000; 20,000-row loads
    # ~4-6 µs a row). Nothing waits on them: queries and invoices load what is pending first,
    # and the spool keeps rows safe meanwhile.
    batch_rows: int = Field(20000, ge=1, description="Load into DuckDB after this many rows...")
    flush_interval: float = Field(5.0, gt=0, description="...or after this long, whichever first.")
    memory_limit: str = Field(
        "512MB",
        pattern=r"^\d+(\.\d+)?\s*[KMGT]i?B$",
        description="DuckDB's memory cap, e.g. 512MB.",
    )
    # admin SQL (/admin/sql, tollway sql) is bounded so that no query can stop the admin
    # plane or the gateway (plugins.metering.analytics)
    query_timeout: float = Field(
        5.0, gt=0, description="An admin SQL query running longer is interrupted (a 400)."
    )
    query_max_rows: int = Field(
        100_000, ge=1, description="Largest admin SQL answer in rows; more is a 400."
    )
    query_max_bytes: int = Field(
        16 << 20, ge=1024, description="Largest admin SQL answer in bytes of JSON; more is a 400."
    )
    query_concurrency: int = Field(
        2,
        ge=1,
        le=64,
        description="Admin SQL queries running at once; one more is refused with a 429.",
    )
    query_memory_limit: str = Field(
        "256MB",
        pattern=r"^\d+(\.\d+)?\s*[KMGT]i?B$",
        description="Memory one admin SQL query may use for sorts, joins and aggregates.",
    )
    temp_limit: str = Field(
        "1GB",
        pattern=r"^\d+(\.\d+)?\s*[KMGT]i?B$",
        description="Disk DuckDB may spill to (DATABASE.tmp); a query needing more fails.",
    )
    export_dir: str = Field(
        "data/exports",
        description="/admin/export writes only into folders under this one (relative names).",
    )

    sink: Literal["duckdb", "redis"] = Field(
        "duckdb",
        description="duckdb: this gateway owns the database; redis: rows go to the Redis "
        "stream of state.url and `tollway meter` loads them (several instances).",
    )
    retention: float | None = Field(
        None, gt=0, description="Delete usage rows older than this (e.g. 400d); null keeps all."
    )
    ip_hash_key: SecretStr | None = Field(
        None,
        min_length=16,
        description="Key of the HMAC-SHA256 that turns client IPs into client_ip_hash (at least "
        "16 characters, e.g. {$env: NAME}); null: a random key created once in a file beside "
        "the database (DATABASE with suffix .ip_hash_key). Set it so several instances (sink "
        "redis) hash alike.",
    )

    @field_validator("flush_interval", "retention", "query_timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float | None:
        return None if v is None else parse_duration(v)

    @field_validator("sink")
    @classmethod
    def _stream_needs_redis(cls, v: str, info: ValidationInfo) -> str:
        policy = policy_of(info)
        if v == "redis" and policy is not None and not policy.state.distributed:
            raise ValueError("sink redis needs state.url: redis://...")
        return v

    @model_validator(mode="after")
    def _export_dir_apart(self) -> MeteringConfig:
        # the database may read its export directory, so admin SQL can: it must not hold the
        # database's neighbours (keys.json, the ip_hash_key file)
        exports = os.path.join(os.path.realpath(self.export_dir), "")
        if os.path.realpath(self.database).startswith(exports):
            raise ValueError("export_dir must be a folder of its own, not one holding database")
        return self

    def query_limits(self) -> QueryLimits:
        return QueryLimits(
            timeout=self.query_timeout,
            max_rows=self.query_max_rows,
            max_bytes=self.query_max_bytes,
            concurrency=self.query_concurrency,
            memory_limit=self.query_memory_limit,
        )

    def open_database(self, spool_dir: str | Path | None = None) -> UsageDB:
        """The database, sandboxed: DuckDB may touch files only in the spool folder the
        loader reads (default DATABASE.spool) and the export directory."""
        from plugins.metering.database import UsageDB  # DuckDB only where a database is opened

        return UsageDB(
            self.database,
            self.memory_limit,
            spool_dir=spool_dir,
            export_dirs=(self.export_dir,),
            temp_limit=self.temp_limit,
        )


PRUNE_EVERY = 3600.0
"""Seconds between two deletions of rows past ``retention`` (and one at start)."""

LOADER_NICE = 10
"""Nice steps the loader thread runs below the rest of the process (Linux, capped at 19)."""


def _background_priority() -> None:
    """Lower the calling thread's CPU priority (Linux: a thread is a schedulable task).

    A load is tens of ms of DuckDB work; on a small machine it would otherwise take a core
    that requests need (measured at c=1 on 2 vCPUs: p99 +0.4 ms per load in a 10 s run). At a
    lower priority it runs on idle CPU first and still gets its share when the CPU is busy.
    DuckDB releases the GIL while it works, so the event loop is not left waiting on it.
    """
    with contextlib.suppress(OSError, AttributeError):
        me = threading.get_native_id()
        os.setpriority(
            os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + LOADER_NICE)
        )


class UsageStore:
    """The database, the spool and the loader task: one per process, kept across reloads."""

    def __init__(self, config: MeteringConfig, state_url: str = "memory://") -> None:
        db_path = Path(config.database)
        # sink redis: rows go to the stream and ``tollway meter`` owns the database
        self.shipper = StreamShipper(state_url) if config.sink == "redis" else None
        self.db: UsageDB | None = None
        self.analytics: Analytics | None = None
        self.export_dir = config.export_dir
        spool_dir = Path(config.spool_dir) if config.spool_dir else db_path.with_suffix(".spool")
        if self.shipper is None:
            # a gateway with sink redis never loads DuckDB (~60 MB resident)
            self.db = config.open_database(spool_dir)
            self.analytics = Analytics(self.db, config.query_limits(), config.export_dir)
        # where the loader puts a closed spool segment: the database, or the stream
        self._sink = self.db.ingest if self.db is not None else self.shipper.ship  # type: ignore[union-attr]
        self.spool = Spool(spool_dir)
        self.batch_rows = config.batch_rows
        self.interval = config.flush_interval
        self.retention = config.retention
        self.pruned_at = 0.0
        self.pruned_rows = 0
        self.tier_costs: dict[str, float] = {}
        self.plan_terms: dict[str, PlanTerms] = {}  # quotas and overage prices (invoices)
        self.loaded_rows = 0
        self.loaded_until = 0.0  # every row written before this time is loaded (or shipped)
        self.unpriced = 0
        self.load_seconds = 0.0
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._keystore: Any = None
        # loads run on one thread of their own, at a lower CPU priority than requests
        self._loader = ThreadPoolExecutor(
            1, thread_name_prefix="tollway-usage-loader", initializer=_background_priority
        )

    async def start(self) -> None:
        # rows spooled by a previous process (even one that was killed) are loaded first
        await self.flush()
        await self.prune()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def append(self, row: dict[str, Any]) -> None:
        self.spool.append(row)
        if self.spool.rows >= self.batch_rows:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            try:
                await self.flush()
            except Exception as e:
                if is_state_error(e):  # sink redis with Redis down: one line a flush, no trace
                    log.warning(
                        "shipping usage rows failed (%s); they stay in the spool and are retried",
                        type(e).__name__,
                    )
                else:
                    log.exception(
                        "loading usage rows failed; they stay in the spool and are retried"
                    )
            try:
                await self.prune()
            except Exception:
                log.exception("deleting usage rows past their retention failed; retried later")

    def unloaded_age(self) -> float:
        """Seconds since the oldest row not yet loaded (or shipped) was written; 0: none."""
        oldest = self.spool.oldest_ts()
        return 0.0 if oldest is None else round(max(0.0, time.time() - oldest), 3)

    async def prune(self, now: float | None = None) -> int:
        """Delete rows older than the retention period, at most once an hour."""
        now = time.time() if now is None else now
        if self.retention is None or self.db is None or now - self.pruned_at < PRUNE_EVERY:
            return 0
        self.pruned_at = now
        loop = asyncio.get_running_loop()
        n = await loop.run_in_executor(
            self._loader, partial(self.db.delete_rows, before=now - self.retention)
        )
        self.pruned_rows += n
        return n

    async def forget_user(self, user: str) -> int:
        """Delete every usage row of ``user``, those still in the spool included."""
        await self.flush()
        loop = asyncio.get_running_loop()
        if self.db is None:  # the meter deletes them, after the rows shipped before
            assert self.shipper is not None
            await loop.run_in_executor(self._loader, self.shipper.forget, user)
            return 0
        return await loop.run_in_executor(self._loader, partial(self.db.delete_rows, user=user))

    async def flush(self) -> None:
        """Close the open segment and load every closed one, and the segments of dead
        processes on the same spool folder (``plugins.metering.spool``)."""
        async with self._lock:
            now = time.time()  # every row this process wrote before now is loaded after this
            self.spool.rotate()
            await self.load()
            self.loaded_until = now
            if self.shipper is not None:  # tell the meter up to when this gateway has shipped
                try:
                    await asyncio.get_running_loop().run_in_executor(
                        self._loader, self._shipped, now
                    )
                except Exception as e:  # Redis down with nothing to ship: the next flush marks
                    if not is_state_error(e):
                        raise

    def _shipped(self, until: float) -> None:
        """After a flush's ships, in the loader thread (one trip): the mark first, right after
        the ships it speaks for (a meter's answer between the two would claim less freshness
        than there is), then the kept segments: deleted once loaded, shipped again if Redis
        lost them (``StreamShipper.settle``)."""
        assert self.shipper is not None
        self.shipper.mark(self.spool.owner, until)
        self.shipper.settle(self.spool.folder)

    async def load(self) -> None:
        for segment in self.spool.closed():
            await self._load(segment)
        for owner in self.spool.orphan_owners():
            with self.spool.adopt(owner) as segments:  # nothing if the owner is alive
                for segment in segments:
                    await self._load(segment)
                if segments and self.shipper is not None:
                    await asyncio.get_running_loop().run_in_executor(
                        self._loader, self.shipper.unmark, owner
                    )

    async def _load(self, segment: Path) -> None:
        t0 = time.perf_counter()
        n = await asyncio.get_running_loop().run_in_executor(self._loader, self._sink, segment)
        self.load_seconds += time.perf_counter() - t0
        self.loaded_rows += n

    async def close(self) -> None:
        if self.analytics is not None:  # first: shutdown never waits on an admin query
            await self.analytics.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
        if self.shipper is not None and not self.spool.closed():  # all shipped: no mark left
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(
                    self._loader, self.shipper.unmark, self.spool.owner
                )
        self._loader.shutdown()
        self.spool.close()
        if self.db is not None and not (self.analytics and self.analytics.busy):
            self.db.close()  # (a call that ignored its interrupt keeps it: the process exits)
        if self.shipper is not None:
            self.shipper.close()

    # ---- the AnalyticsBackend protocol (proxy.analytics) -----------------------------------

    @property
    def database(self) -> UsageDB:
        assert self.db is not None, "no database here: sink redis (tollway meter owns it)"
        return self.db

    @property
    def _analytics(self) -> Analytics:
        assert self.analytics is not None, "no database here: sink redis (tollway meter owns it)"
        return self.analytics

    async def sql(self, query: str) -> tuple[list[str], list[list[Any]]]:
        self._analytics.check_capacity()  # refused before any work
        await self.flush()
        FRESH_AS_OF.set(self.loaded_until)
        return await self._analytics.sql(query)

    async def invoice(self, user: str, month: str) -> dict[str, Any]:
        await self.flush()
        current = None
        if self._keystore is not None:
            tiers = [r.tier for r in self._keystore.list() if r.user == user]
            current = tiers[-1] if tiers else None
        return await self._analytics.invoice(user, month, self.tier_costs, current, self.plan_terms)

    async def export_parquet(self, folder: str) -> tuple[str, int]:
        export_target(self.export_dir, folder)  # a bad name is refused before any work
        await self.flush()
        return await self._analytics.export_parquet(folder)


class MeteringPlugin:
    """Writes the usage rows; see the module docstring for the billing rules."""

    Config = MeteringConfig

    def __init__(self, config: MeteringConfig, policy: Policy) -> None:
        self.config = config
        self.policy = policy
        self.prices = {name: f.price_per_request for name, f in policy.features.items()}
        self.tier_prices = {name: t.prices for name, t in policy.tiers.items() if t.prices}
        self.tier_costs = policy.tier_costs()
        self.sla_tiers = policy.tiers_with("sla_guarantee")
        self.store: UsageStore | None = None
        self.ip_hash: IpHasher | None = None  # set in lifespan (reads or creates the key)
        self.dashboard = Dashboard()  # figures computed once per interval for every poll

    @hookimpl
    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        secret = self.config.ip_hash_key
        self.ip_hash = IpHasher(
            secret.get_secret_value().encode("utf-8", "surrogateescape")
            if secret is not None
            else load_or_create_key(key_file(self.config.database))
        )
        resources = app[RESOURCES]
        store = resources.find(_STORE)
        if store is None:
            store = UsageStore(self.config, self.policy.state.url)
            await store.start()
            resources.put(_STORE, store)
            resources.on_close(store.close)
            if store.analytics is not None:  # admin queries stop when the shutdown begins
                resources.on_shutdown(store.analytics.stop_all)
        store._keystore = app[KEYSTORE]
        store.tier_costs = self.tier_costs
        store.plan_terms = plan_terms(self.policy.tiers)
        if store.db is not None:  # with sink redis, analytics are the meter's
            await asyncio.to_thread(
                store.db.set_tier_prices, self.tier_costs, self.sla_tiers, store.plan_terms
            )
            resources.put(ANALYTICS, store)
        self.store = store
        app[METRICS].add(
            "metering",
            lambda: {
                "tollway_usage_rows_spooled": (
                    "counter",
                    "Usage rows written to the spool.",
                    store.spool.total,
                    (),
                ),
                "tollway_usage_rows_loaded": (
                    "counter",
                    "Usage rows loaded into DuckDB.",
                    store.loaded_rows,
                    (),
                ),
                "tollway_unpriced_requests": (
                    "counter",
                    "Requests to a model without a price (cost_usd NULL).",
                    store.unpriced,
                    (),
                ),
                "tollway_usage_oldest_unloaded_age_seconds": (
                    "gauge",
                    "Age of the oldest usage row still in the spool (0: none).",
                    store.unloaded_age(),
                    (),
                ),
                "tollway_usage_load_seconds": (
                    "counter",
                    "Time spent loading rows into DuckDB.",
                    store.load_seconds,
                    (),
                ),
                "tollway_admin_queries_stopped": (
                    "counter",
                    "Admin SQL queries interrupted at query_timeout.",
                    store.analytics.timeouts if store.analytics else 0,
                    (),
                ),
                "tollway_admin_queries_refused": (
                    "counter",
                    "Admin SQL queries refused because query_concurrency were running.",
                    store.analytics.refused if store.analytics else 0,
                    (),
                ),
            },
        )
        yield

    @hookimpl
    async def dashboard_figures(self) -> Figures | None:
        store = self.store
        if store is None or store.db is None:  # sink redis: the meter holds the usage views
            return None
        return await self.dashboard.figures(store)

    @hookimpl
    async def account_report(self, principal: Principal, month: str) -> dict[str, Any] | None:
        """The caller's usage, cache savings and bill this month (``GET /v1/tollway/usage``);
        see ``plugins.metering.account``."""
        if self.store is None:
            return None
        return await account.report(self.store, principal.user_id, month)

    @hookimpl
    def data_files(self) -> dict[str, str]:
        # with sink redis the rows go to the stream: ``tollway meter`` keeps the database
        return {"usage": self.config.database} if self.config.sink == "duckdb" else {}

    @staticmethod
    @hookimpl
    def register_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        from plugins.metering.cli import register  # the commands import DuckDB only when run

        register(subparsers)

    def price(self, ctx: RequestContext) -> float:
        return request_price(ctx, self.prices, self.tier_prices)  # the budgets plugin's too

    def row(self, ctx: RequestContext) -> dict[str, Any]:
        route = ctx.route
        principal = ctx.principal
        usage = ctx.usage
        inp, out, estimated = billed_tokens(ctx)  # estimated for a stream that ended early
        in_price = route.input_per_mtok if route else None
        out_price = route.output_per_mtok if route else None
        price = request_price(ctx, self.prices, self.tier_prices)  # as self.price, one call less
        if ctx.endpoint in UNBILLED_ENDPOINTS:  # a token count: free, and not sold
            in_price = out_price = price = 0.0
            estimated = ctx.status < 400 and not usage.reported  # the gateway's estimate
        # a cache hit or a coalesced follower cost the provider nothing: record what it saved
        hit = ctx.cache == "hit" or ctx.shared == "coalesced"
        t = ctx.timings  # Timings.latency_ms and ttfb_ms, inlined (one row per request)
        latency = ((t.end or time.perf_counter()) - t.start) * 1000.0
        ttfb = (t.first_byte - t.start) * 1000.0 if t.first_byte else None
        return {
            "ts": time.time(),
            "request_id": ctx.request_id,
            "user_id": principal.user_id if principal else None,
            "key_id": principal.key_id if principal else None,
            "tier": principal.tier if principal else None,
            "feature": ctx.feature,
            "endpoint": ctx.endpoint,
            "provider": route.provider if route else None,
            "model": route.model if route else (ctx.model or None),
            "upstream_model": route.upstream_model if route else None,
            "stream": ctx.stream,
            "status": ctx.status,
            "error_code": ctx.error_code,
            "cache": ctx.cache,
            "input_tokens": inp,
            "output_tokens": out,
            "usage_estimated": estimated,
            "latency_ms": latency,
            "ttfb_ms": ttfb or (None if ctx.stream else latency),
            "input_per_mtok": in_price,
            "output_per_mtok": out_price,
            "price": price,
            "saved_input": inp if hit else 0,
            "saved_output": out if hit else 0,
            "retries": ctx.retries,
            # keyed, never the address itself (plugins.metering.ip_hash); set before any request
            "client_ip_hash": self.ip_hash(ctx.client_ip) if self.ip_hash else None,
            "shared": ctx.shared,
            "upstream_request_id": ctx.upstream_request_id,
            "labels": principal.attrs.get("labels") if principal else None,  # the key's
        }

    @hookimpl
    async def forget_user(self, user_id: str) -> dict[str, int]:
        store = self.store
        assert store is not None
        n = await store.forget_user(user_id)
        if store.db is None:  # sink redis: the meter deletes them; nothing is counted here
            return {"usage_deletions_sent_to_meter": 1}
        await self.dashboard.forget()  # its cached top users may name them
        return {"usage_rows": n}

    @hookimpl
    async def response_complete(self, ctx: RequestContext) -> None:
        # the row goes to disk before the reply's last bytes do: once the client has the whole
        # reply, its row survives even a SIGKILL right after
        if self.store is not None:
            self._record(ctx)

    @hookimpl
    async def log(self, ctx: RequestContext) -> None:
        if self.store is not None and _WRITTEN not in ctx.stash:
            self._record(ctx)

    def _record(self, ctx: RequestContext) -> None:
        assert self.store is not None
        ctx.stash[_WRITTEN] = True
        row = self.row(ctx)
        if (
            ctx.route is not None
            and ctx.status < 400
            and ctx.cache != "hit"
            and ctx.shared != "coalesced"
            and (
                row["input_per_mtok"] is None
                or (row["output_tokens"] and row["output_per_mtok"] is None)
            )
        ):
            self.store.unpriced += 1
        self.store.append(row)
