"""A key holder's own usage this month (``GET /v1/tollway/usage``): by feature and by model,
cache savings and the bill so far.

The numbers come from the usage table through the same bounded analytics path as
``/admin/sql`` and invoices (``plugins.metering.analytics``: pending rows loaded first, worker
threads of its own, a time limit), with the user bound as a query parameter: the user is the
caller's key's, never text from the request, and no statement here is built from it.

What a customer sees is what they are billed for: requests answered (``status < 400``, cache
hits included, as on the invoice), their tokens and ``price_usd`` (what the customer pays).
The provider's cost (``cost_usd``) is the operator's business and is not shown; for cache hits
and coalesced requests ``saved_usd`` (the provider cost the cache avoided) is.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import duckdb

    from plugins.metering.plugin import UsageStore

SINK_REDIS_NOTE = (
    "usage, cache savings and the bill are kept by the meter (metering sink: redis), not by "
    "this gateway; ask the operator, whose admin API on the meter has them"
)

_BY = {"feature": "coalesce(feature, '-')", "model": "coalesce(model, '-')"}
"""The two breakdowns; fixed SQL, never built from input."""


def month_bounds(month: str) -> tuple[datetime, datetime]:
    """The first instant of ``month`` (``YYYY-MM``) and of the next, naive UTC as stored."""
    start = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start.replace(tzinfo=None), end.replace(tzinfo=None)


def _money(value: Decimal | None) -> str:
    """An exact amount as text (DECIMAL, no float rounding): ``"0.0300"`` -> ``"0.03"``."""
    if value is None:
        return "0"
    return format(value.normalize(), "f") if value else "0"


def usage_of(
    user: str, start: datetime, end: datetime, *, cur: duckdb.DuckDBPyConnection
) -> dict[str, Any]:
    """The user's answered requests between ``start`` and ``end``: totals, by feature, by
    model, and what the cache saved (runs in an analytics worker thread, on ``cur``)."""
    where = "WHERE user_id = ? AND ts >= ? AND ts < ? AND status < 400"
    args = [user, start, end]
    cur.execute("BEGIN TRANSACTION READ ONLY")  # one snapshot: the parts add up
    try:
        groups: dict[str, list[dict[str, Any]]] = {}
        for name, column in _BY.items():
            rows = cur.execute(
                f"SELECT {column} AS k, count(*), coalesce(sum(input_tokens), 0), "
                f"coalesce(sum(output_tokens), 0), sum(price_usd) FROM usage {where} "
                "GROUP BY k ORDER BY k",
                args,
            ).fetchall()
            groups[name] = [
                {
                    name: k,
                    "requests": int(n),
                    "input_tokens": int(i),
                    "output_tokens": int(o),
                    "price_usd": _money(p),
                }
                for k, n, i, o, p in rows
            ]
        total = cur.execute(
            "SELECT count(*), coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0), "
            "sum(price_usd), count(*) FILTER (WHERE cache = 'hit'), "
            "count(*) FILTER (WHERE shared = 'coalesced'), sum(saved_usd) "
            f"FROM usage {where}",
            args,
        ).fetchone()
    finally:
        cur.execute("ROLLBACK")
    assert total is not None
    n, i, o, price, hits, coalesced, saved = total
    return {
        "usage": {
            "requests": int(n),
            "input_tokens": int(i),
            "output_tokens": int(o),
            "price_usd": _money(price),
            "by_feature": groups["feature"],
            "by_model": groups["model"],
        },
        "cache": {
            "hits": int(hits),
            "coalesced": int(coalesced),
            "saved_usd": _money(saved),
        },
    }


async def report(store: UsageStore, user: str, month: str) -> dict[str, Any]:
    """The metering sections of the self-service answer: ``usage``, ``cache`` and ``bill``
    (the month's invoice so far, as ``/admin/invoices`` computes it). With ``sink: redis`` this
    gateway has no database: the sections are null and ``notes`` says where they are."""
    if store.analytics is None:
        return {"usage": None, "cache": None, "bill": None, "notes": [SINK_REDIS_NOTE]}
    bill = await store.invoice(user, month)  # loads every pending row first
    start, end = month_bounds(month)
    sections = await store.analytics.read(usage_of, user, start, end)
    bill.pop("user", None)  # the caller knows who they are; the answer names them once
    return {**sections, "bill": bill}
