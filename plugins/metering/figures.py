"""The metering plugin's dashboard figures: history charts, money and latency cards, top tables.

The dashboard polls ``/admin/stats`` every 5 s, possibly from several browsers. Everything
here is read from the rollups (``plugins.metering.rollups``) and ``plans``, never from the
``usage`` table, so a poll costs the same at a thousand requests as at a billion: the last
hour reads at most 60 minutes of rows, the last day 1,440, this month 31 days of day rows and
this month's user-days. The queries are fixed and parameterised and run through the analytics
backend's fixed-read path (``Analytics.read``: worker threads of its own, the query time
limit), in one READ ONLY transaction, so every figure of one answer comes from one snapshot and
they add up. The computed figures are kept for ``CACHE_SECONDS``: any number of dashboards cost
one computation per interval.

Times are UTC. Chart points start on whole minutes (the hour: 60 points of 60 s, the current
minute last) or on whole quarters of an hour (the day: 96 points of 900 s). A point with no
requests has 0 requests and no rate (None: the line breaks, it does not fall to 0 %). The day's
``requests`` are the average per minute over the minutes of its bucket that have begun.

Money is exact (Decimal, written as text in JSON). Revenue is what the ``business`` view counts:
usage revenue (``price_usd``) plus subscriptions, each user active this month paying their
tier's ``monthly_cost`` (their tier on their latest day of the month); revenue *today* is usage
revenue only (subscriptions are monthly). Latency percentiles come from the latency histogram,
within 2.5 % of the exact value (see the rollups).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from plugins.metering.rollups import nearest_rank
from proxy.analytics import QueryError
from proxy.figures import Card, Chart, Column, Figures, Series, Table

if TYPE_CHECKING:
    import duckdb

    from plugins.metering.analytics import Analytics

CACHE_SECONDS = 4.0
"""How long one computation of the figures answers every poll (the page polls every 5 s)."""

WINDOWS = (("hour", 60, 60), ("day", 900, 96))
"""The charts' windows: (name, seconds per point, points)."""

TOP = 10
"""Rows of each top table."""

QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))

# ---- the queries: rollups and plans only (tests/plugins/metering/test_rollups.py checks) ----

POINTS = """
SELECT CAST(floor(epoch(minute) / $step) AS BIGINT) * $step AS point,
       sum(requests), sum(errors), sum(cache_hits), sum(cache_lookups)
FROM usage_minutes WHERE minute >= $start AND minute <= $end
GROUP BY ALL
"""
"""Per point of a window: requests, errors, cache hits and lookups."""

LATENCY = """
SELECT CAST(floor(epoch(minute) / $step) AS BIGINT) * $step AS point, bucket, sum(requests)
FROM latency_minutes WHERE minute >= $start AND minute <= $end
GROUP BY ALL ORDER BY point, bucket
"""
"""Per point of a window: its latency histogram."""

TOTALS = """
SELECT sum(requests) FILTER (WHERE day = $today),
       coalesce(sum(revenue_usd) FILTER (WHERE day = $today), 0),
       coalesce(sum(cost_usd) FILTER (WHERE day = $today), 0),
       coalesce(sum(requests), 0), coalesce(sum(revenue_usd), 0), coalesce(sum(cost_usd), 0),
       coalesce(sum(errors), 0), coalesce(sum(rate_limited), 0), coalesce(sum(cache_hits), 0),
       coalesce(sum(cache_lookups), 0), coalesce(sum(unpriced), 0),
       sum(latency_ms_sum), sum(latency_count)
FROM usage_days WHERE day >= $month AND day < $next
"""
"""Today's and this month's totals."""

TOP_BY = """
SELECT nullif({key}, '') AS {key}, sum(requests) AS requests,
       sum(revenue_usd) AS revenue_usd, sum(cost_usd) AS cost_usd
FROM usage_days WHERE day >= $month AND day < $next
GROUP BY ALL ORDER BY requests DESC, {key} LIMIT {top}
"""
"""This month's busiest features or models."""

USERS = f"""
SELECT user_id, nullif(arg_max(tier, day), '') AS tier, sum(requests) AS requests,
       coalesce(sum(requests) FILTER (WHERE day = $today), 0) AS today_requests,
       sum(revenue_usd) AS revenue_usd, sum(cost_usd) AS cost_usd
FROM user_days WHERE day >= $month AND day < $next
GROUP BY user_id ORDER BY requests DESC, user_id LIMIT {TOP}
"""
"""This month's top users, with their tier (of their latest day) and today's requests."""

MONTH_USERS = """
WITH cur AS (
    SELECT user_id, arg_max(tier, day) AS tier, count(*) AS days
    FROM user_days WHERE day >= $month AND day < $next GROUP BY user_id
),
prev AS (
    SELECT DISTINCT user_id FROM user_days WHERE day >= $previous AND day < $month
)
SELECT (SELECT count(*) FROM cur),
       (SELECT coalesce(sum(coalesce(p.monthly_cost, 0)), 0)
        FROM cur LEFT JOIN plans p ON p.tier = cur.tier),
       (SELECT coalesce(sum(days), 0) FROM cur),
       (SELECT count(*) FROM prev),
       (SELECT count(*) FROM prev WHERE user_id NOT IN (SELECT user_id FROM cur))
"""
"""This month's active users, their subscriptions (MRR), user-days, and churn."""

QUERIES = (POINTS, LATENCY, TOTALS, TOP_BY, USERS, MONTH_USERS)


def _utc(epoch: float) -> datetime:
    """Naive UTC, as the usage database stores time."""
    return datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None)


def _month_start(day: date) -> date:
    return day.replace(day=1)


def _rate(part: float, whole: float) -> float | None:
    return 100.0 * part / whole if whole else None


@dataclass(slots=True, frozen=True)
class _Window:
    name: str
    step: int
    times: list[float]
    requests: list[float | None]
    errors: list[float | None]
    cache: list[float | None]
    latency: dict[str, list[float | None]]
    histogram: dict[int, int]  # the whole window's (cards of the last hour)
    totals: tuple[int, int, int, int]  # requests, errors, cache hits, lookups


def _window(
    cur: duckdb.DuckDBPyConnection, name: str, step: int, points: int, now: float
) -> _Window:
    """One window's points, ending with the point ``now`` is in."""
    last = math.floor(now / step) * step
    first = last - (points - 1) * step
    times = [float(first + i * step) for i in range(points)]
    span = {"step": step, "start": _utc(first), "end": _utc(now)}
    counts = {int(r[0]): r[1:] for r in cur.execute(POINTS, span).fetchall()}
    hist: dict[int, list[tuple[int, int]]] = {}
    whole: dict[int, int] = {}
    for at, bucket, n in cur.execute(LATENCY, span).fetchall():
        hist.setdefault(int(at), []).append((int(bucket), int(n)))
        whole[int(bucket)] = whole.get(int(bucket), 0) + int(n)
    now_minute = math.floor(now / 60) * 60
    requests: list[float | None] = []
    errors: list[float | None] = []
    cache: list[float | None] = []
    sums = [0, 0, 0, 0]
    for t in times:
        req, err, hits, lookups = (int(x) for x in counts.get(int(t), (0, 0, 0, 0)))
        for i, x in enumerate((req, err, hits, lookups)):
            sums[i] += x
        minutes = min(step, now_minute - t + 60) / 60  # the minutes of the point that began
        requests.append(req / minutes)
        errors.append(_rate(err, req))
        cache.append(_rate(hits, lookups))
    latency = {
        label: [nearest_rank(hist.get(int(t), []), q) for t in times] for label, q in QUANTILES
    }
    return _Window(
        name,
        step,
        times,
        requests,
        errors,
        cache,
        latency,
        whole,
        (sums[0], sums[1], sums[2], sums[3]),
    )


def _charts(w: _Window) -> list[Chart]:
    per = "minute" if w.step == 60 else f"minute, {w.step // 60}-minute average"
    return [
        Chart(
            f"requests_{w.name}",
            f"Requests per {per}",
            w.name,
            w.step,
            w.times,
            (Series("requests", w.requests),),
        ),
        Chart(
            f"error_rate_{w.name}",
            "Error rate",
            w.name,
            w.step,
            w.times,
            (Series("errors", w.errors),),
            "percent",
        ),
        Chart(
            f"cache_hit_rate_{w.name}",
            "Cache hit rate",
            w.name,
            w.step,
            w.times,
            (Series("hits", w.cache),),
            "percent",
        ),
        Chart(
            f"latency_{w.name}",
            "Latency of answered requests",
            w.name,
            w.step,
            w.times,
            tuple(Series(label, values) for label, values in w.latency.items()),
            "ms",
        ),
    ]


def _records(
    cur: duckdb.DuckDBPyConnection, sql: str, args: dict[str, Any]
) -> list[dict[str, Any]]:
    rows = cur.execute(sql, args).fetchall()
    columns = [d[0] for d in cur.description or []]
    return [dict(zip(columns, r, strict=True)) for r in rows]


TOP_USERS = (
    Column("user_id", "user"),
    Column("requests", "requests", "count"),
    Column("today_requests", "today", "count"),
    Column("revenue_usd", "revenue", "money"),
    Column("cost_usd", "provider cost", "money"),
    Column("tier", "tier"),
)


def _top_table(name: str, title: str, key: str, heading: str, rows: list[dict[str, Any]]) -> Table:
    columns = (
        Column(key, heading),
        Column("requests", "requests", "count"),
        Column("revenue_usd", "revenue", "money"),
        Column("cost_usd", "provider cost", "money"),
    )
    return Table(name, title, columns, rows)


def compute(now: float, *, cur: duckdb.DuckDBPyConnection) -> Figures:
    """Every figure at ``now`` (epoch seconds), in one READ ONLY snapshot (in an analytics
    worker thread, on ``cur``)."""
    today = _utc(now).date()
    month = _month_start(today)
    previous = _month_start(date.fromordinal(month.toordinal() - 1))
    # rows of a later month (an instance whose clock runs ahead) wait for their month
    following = _month_start(date.fromordinal(month.toordinal() + 31))
    days = {"today": today, "month": month, "next": following}
    this_month = {"month": month, "next": following}
    cur.execute("BEGIN TRANSACTION READ ONLY")
    try:
        windows = [_window(cur, name, step, points, now) for name, step, points in WINDOWS]
        totals = cur.execute(TOTALS, days).fetchone()
        assert totals is not None
        features = _records(cur, TOP_BY.format(key="feature", top=TOP), this_month)
        models = _records(cur, TOP_BY.format(key="model", top=TOP), this_month)
        users = _records(cur, USERS, days)
        month_users = cur.execute(MONTH_USERS, {**this_month, "previous": previous}).fetchone()
        assert month_users is not None
    finally:
        cur.execute("ROLLBACK")
    (
        today_requests,
        today_revenue,
        today_cost,
        requests,
        usage_revenue,
        cost,
        errors,
        rate_limited,
        hits,
        lookups,
        unpriced,
        latency_sum,
        latency_count,
    ) = totals
    active, mrr, user_days, previous_users, churned = month_users
    revenue = Decimal(usage_revenue) + Decimal(mrr)
    margin = float(100 * (revenue - cost) / revenue) if revenue > 0 else None
    churn = 100.0 * churned / previous_users if previous_users else None
    business = {
        "month": month.strftime("%Y-%m"),
        "requests": int(requests),
        "active_users": int(active),
        "revenue_usd": revenue,
        "usage_revenue_usd": usage_revenue,
        "mrr_usd": mrr,
        "provider_cost_usd": cost,
        "cost_per_request_usd": cost / max(int(requests), 1),
        "profit_margin": margin,
        "churned_users": int(churned),
        "churn_rate": churn,
        "customer_lifetime_value_usd": (
            float(revenue) / active / (churned / previous_users) if churned and active else None
        ),
    }
    kpis = {
        "window": "month",
        "requests": int(requests),
        "requests_per_user_per_day": int(requests) / max(int(user_days), 1),
        "cache_hit_rate": _rate(hits, lookups),
        "avg_response_ms": latency_sum / latency_count if latency_count else None,
        "error_rate": _rate(errors, requests),
        "rate_limited": int(rate_limited),
        "unpriced_requests": int(unpriced),
    }
    hour = windows[0]
    h_req, h_err, h_hits, h_lookups = hour.totals
    histogram = sorted(hour.histogram.items())
    last_hour = {
        "requests": h_req,
        "error_rate": _rate(h_err, h_req),
        "cache_hit_rate": _rate(h_hits, h_lookups),
        **{f"{label}_ms": nearest_rank(histogram, q) for label, q in QUANTILES},
    }
    today_figures = {
        "requests": int(today_requests or 0),
        "revenue_usd": today_revenue,
        "provider_cost_usd": today_cost,
    }
    cards = (
        Card("revenue_today_usd", "revenue today", today_revenue, "money"),
        Card("revenue_usd", "revenue this month", revenue, "money"),
        Card("provider_cost_today_usd", "provider cost today", today_cost, "money"),
        Card("provider_cost_usd", "provider cost this month", cost, "money"),
        Card("profit_margin", "margin this month", margin, "percent"),
        Card("mrr_usd", "MRR", mrr, "money"),
        Card("active_users", "active users this month", int(active)),
        Card("hour_requests", "requests last hour", h_req),
        Card("hour_error_rate", "error rate last hour", last_hour["error_rate"], "percent"),
        Card(
            "hour_cache_hit_rate",
            "cache hit rate last hour",
            last_hour["cache_hit_rate"],
            "percent",
        ),
        *(
            Card(f"hour_{label}_ms", f"{label} latency last hour", last_hour[f"{label}_ms"], "ms")
            for label, _ in QUANTILES
        ),
    )
    tables = (
        Table("top_users", "Top users this month", TOP_USERS, users),
        _top_table("top_features", "Top features this month", "feature", "feature", features),
        _top_table("top_models", "Top models this month", "model", "model", models),
    )
    return Figures(
        cards=cards,
        tables=tables,
        charts=tuple(c for w in windows for c in _charts(w)),
        sections={
            "usage": {
                "kpis": kpis,
                "business": business,
                "top_users": users,
                "top_features": features,
                "top_models": models,
                "history": {"last_hour": last_hour, "today": today_figures},
            }
        },
    )


class UsageSource(Protocol):
    """Where the figures are read: a gateway's ``UsageStore`` (sink duckdb) or the meter's
    database (``plugins.metering.meter``), each loading what is pending first."""

    @property
    def analytics(self) -> Analytics | None: ...

    async def flush(self) -> None: ...


class Dashboard:
    """The figures, computed at most once per ``CACHE_SECONDS`` however many pages poll."""

    def __init__(self, ttl: float = CACHE_SECONDS) -> None:
        self.ttl = ttl
        self._figures: Figures | None = None
        self._at = -math.inf
        self._lock = asyncio.Lock()
        self.computed = 0  # computations so far (the cache's effect is measurable)

    async def forget(self) -> None:
        """Drop the cached figures (a user was erased: the next poll must not show them);
        after a computation under way, which may have read the user's rows."""
        async with self._lock:
            self._figures = None
            self._at = -math.inf

    async def figures(self, store: UsageSource) -> Figures:
        """The cached figures, or new ones (pending rows loaded first). When the database
        cannot answer now (too many analytics calls, a time limit, a shutdown), the last
        figures answer, or none."""
        async with self._lock:  # polls arriving together wait for one computation
            if time.monotonic() - self._at < self.ttl and self._figures is not None:
                return self._figures
            assert store.analytics is not None
            await store.flush()
            try:
                self._figures = await store.analytics.read(compute, time.time())
            except QueryError:
                return self._figures or Figures()
            self._at = time.monotonic()
            self.computed += 1
            return self._figures
