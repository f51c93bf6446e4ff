"""Pre-aggregated usage (rollups), kept in step with the usage table, for the dashboard.

The dashboard polls every few seconds for the last hour, the last day and this month. Scanning
``usage`` (a row per request) for that grows with traffic; these tables grow with time only:

- ``usage_minutes``: one row per UTC minute and (endpoint, feature, model, tier);
- ``usage_days``: the same counts per UTC day (this month's totals read ~31 rows per key, not
  44,640 minutes);
- ``latency_minutes``: per minute, a histogram of answered requests' latency;
- ``user_days``: one row per UTC day, user and tier (top users, active users, MRR).

Counts and sums only, so a load adds to them (``ON CONFLICT ... DO UPDATE SET x = x +
excluded.x``) and any range of them sums to the same figure as a scan of ``usage``. They are
written in the transaction that loads a segment into ``usage`` (``UsageDB.ingest``), from a
temporary table that holds the segment once read, so a row is in ``usage`` exactly when it is
counted here: the segment markers (spool_loads, stream_loads) make a reload add nothing to
either, and a crash rolls both back together. Migration 9 builds them from the existing rows.

The segment is read from that table twice: once counted per minute and key into a second
temporary table (``usage_minutes`` and ``usage_days`` are added from its few rows), once for
the latency histogram and the user-days. Measured on 100,000-row segments, the load costs
about 1 µs a row more than without rollups (2.2-2.5 against 3.2-3.7 µs; a 20,000-row load,
the default batch, ~1.5-2 µs more, as the fixed cost of six more statements is shared by fewer
rows).

A primary key column cannot be NULL in DuckDB, so a missing endpoint, feature, model or tier is
stored as ``''`` (a request refused before its model was known...); so is a feature or model
refused as unknown (``unknown_feature``, ``model_not_found``): the client chose that name, and
counting each under its own key would let one client add a row here per request. The error definition is
the kpis view's: status >= 500 or a provider error (``error_code LIKE 'upstream%'``).

Latency percentiles come from the histogram: bucket ``b`` holds latencies in
``[LOW_MS * RATIO**b, LOW_MS * RATIO**(b+1))`` ms (below LOW_MS: bucket 0), and a percentile is
the geometric middle of the bucket holding the nearest-rank request (DuckDB's
``quantile_disc``), so it is within ``sqrt(RATIO) - 1`` (2.5 %) of the exact value. 10 minutes
of latency take ~370 buckets; a minute holds only the buckets it saw.

Erasure: deleting a user deletes their ``user_days`` rows. The minute and day counts carry no
user and stay (they are the operator's traffic statistics). Retention (``before``) deletes the
rollup rows of the days before the cutoff and recounts the day it falls in from the rows still
in ``usage``, so the tables stay equal to ``usage`` there too.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import duckdb

MONEY = "DECIMAL(18, 9)"
"""Exact money, as the usage table's cost_usd and price_usd."""

LOW_MS = 0.01
"""Latency (ms) where the histogram's bucket 0 ends: anything faster is in it."""
RATIO = 1.05
"""Each latency bucket is 5 % wider than the one before."""

STAGE = "segment_rows"
"""The temporary table ``UsageDB.ingest`` reads a segment into, then inserts from."""

_KEYS = ("endpoint", "feature", "model", "tier")
_COUNTS = f"""
    requests BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    rate_limited BIGINT NOT NULL,
    answered BIGINT NOT NULL,
    cache_hits BIGINT NOT NULL,
    cache_lookups BIGINT NOT NULL,
    unpriced BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    revenue_usd {MONEY} NOT NULL,
    cost_usd {MONEY} NOT NULL,
    latency_ms_sum DOUBLE NOT NULL,
    latency_count BIGINT NOT NULL"""

TABLES = f"""
CREATE TABLE usage_minutes (
    minute TIMESTAMP NOT NULL,
    endpoint VARCHAR NOT NULL, feature VARCHAR NOT NULL, model VARCHAR NOT NULL,
    tier VARCHAR NOT NULL,{_COUNTS},
    PRIMARY KEY (minute, endpoint, feature, model, tier)
);
CREATE TABLE usage_days (
    day DATE NOT NULL,
    endpoint VARCHAR NOT NULL, feature VARCHAR NOT NULL, model VARCHAR NOT NULL,
    tier VARCHAR NOT NULL,{_COUNTS},
    PRIMARY KEY (day, endpoint, feature, model, tier)
);
CREATE TABLE latency_minutes (
    minute TIMESTAMP NOT NULL, bucket SMALLINT NOT NULL, requests BIGINT NOT NULL,
    PRIMARY KEY (minute, bucket)
);
CREATE TABLE user_days (
    day DATE NOT NULL, user_id VARCHAR NOT NULL, tier VARCHAR NOT NULL,
    requests BIGINT NOT NULL, answered BIGINT NOT NULL,
    revenue_usd {MONEY} NOT NULL, cost_usd {MONEY} NOT NULL,
    PRIMARY KEY (day, user_id, tier)
);
"""

_AGGREGATES = {
    "requests": "count(*)",
    "errors": "count(*) FILTER (WHERE status >= 500 OR error_code LIKE 'upstream%')",
    "rate_limited": "count(*) FILTER (WHERE status = 429)",
    "answered": "count(*) FILTER (WHERE status < 400)",
    "cache_hits": "count(*) FILTER (WHERE cache = 'hit')",
    "cache_lookups": "count(*) FILTER (WHERE cache IN ('hit', 'miss'))",
    "unpriced": "count(*) FILTER (WHERE cost_usd IS NULL AND status < 400 "
    "AND cache IS DISTINCT FROM 'hit')",
    "input_tokens": "coalesce(sum(input_tokens), 0)",
    "output_tokens": "coalesce(sum(output_tokens), 0)",
    "revenue_usd": f"CAST(coalesce(sum(price_usd), 0) AS {MONEY})",
    "cost_usd": f"CAST(coalesce(sum(cost_usd), 0) AS {MONEY})",
    "latency_ms_sum": "coalesce(sum(latency_ms) FILTER (WHERE status < 400), 0)",
    "latency_count": "count(latency_ms) FILTER (WHERE status < 400)",
}
_USER_AGGREGATES = {k: _AGGREGATES[k] for k in ("requests", "answered", "revenue_usd", "cost_usd")}

HIGH_MS = 1e12
"""Where the last bucket begins: a latency above it (or not finite: a segment written by hand)
is counted there, since a bucket past SMALLINT would fail the whole segment's load."""

BUCKET = (
    f"CAST(floor(ln(least(greatest(latency_ms, {LOW_MS}), {HIGH_MS}) / {LOW_MS}) / ln({RATIO}))"
    " AS SMALLINT)"
)
"""The latency bucket of a usage row (SQL); NaN is the greatest DOUBLE to least and greatest."""


def bucket_ms(bucket: int) -> float:
    """The latency a bucket stands for: the geometric middle of its bounds."""
    return float(LOW_MS * RATIO ** (bucket + 0.5))


MINUTES = "segment_minutes"
"""The temporary table of a load's rows counted per minute and key: ``usage_minutes`` and
``usage_days`` are both added from it (the days from its few rows, not the segment's many)."""


_REFUSED_NAMES = {
    "feature": "CASE WHEN error_code = 'unknown_feature' THEN '' ELSE coalesce(feature, '') END",
    "model": "CASE WHEN error_code = 'model_not_found' THEN '' ELSE coalesce(model, '') END",
}
"""A feature or model refused as unknown is a name the client made up (any header or JSON
string, up to the body's size, at no rate limit): counted under ``''``, as one key, so a client
cannot grow the minute and day tables a row per request. ``usage`` keeps the name sent."""


def _upsert(table: str, head: dict[str, str], sums: dict[str, str], source: str) -> str:
    """INSERT ``source`` grouped by ``head`` (column: expression), adding to a row there."""
    cols = ", ".join([*head, *sums])
    select = ", ".join([*(f"{e} AS {c}" for c, e in head.items()), *sums.values()])
    update = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in sums)
    return (
        f"INSERT INTO {table} ({cols}) SELECT {select} FROM {source} GROUP BY ALL "
        f"ON CONFLICT ({', '.join(head)}) DO UPDATE SET {update}"
    )


def statements(source: str, where: str = "") -> list[str]:
    """The statements that add ``source``'s rows (usage columns) to every rollup, in order.

    ``where``: a WHERE clause over the source (empty: all of it). The rows are read twice
    (counts per minute and key; the latency histogram and user-days), the days from the
    minutes.
    """
    also = f"{where} AND" if where else "WHERE"
    keys = {k: f"coalesce({k}, '')" for k in _KEYS} | _REFUSED_NAMES
    minute = {"minute": "date_trunc('minute', ts)"} | keys
    head = ", ".join(f"{e} AS {c}" for c, e in minute.items())
    counts = ", ".join(f"{e} AS {c}" for c, e in _AGGREGATES.items())
    summed = {c: f"sum({c})" for c in _AGGREGATES}
    by_key = {k: k for k in _KEYS}
    return [
        f"CREATE TEMP TABLE {MINUTES} AS SELECT {head}, {counts} FROM {source} {where} GROUP BY ALL",
        _upsert("usage_minutes", {"minute": "minute"} | by_key, summed, MINUTES),
        _upsert("usage_days", {"day": "CAST(minute AS DATE)"} | by_key, summed, MINUTES),
        _upsert(
            "latency_minutes",
            {"minute": "date_trunc('minute', ts)", "bucket": BUCKET},
            {"requests": "count(*)"},
            f"{source} {also} status < 400 AND latency_ms IS NOT NULL",
        ),
        _upsert(
            "user_days",
            {"day": "CAST(ts AS DATE)", "user_id": "user_id", "tier": "coalesce(tier, '')"},
            _USER_AGGREGATES,
            f"{source} {also} user_id IS NOT NULL",
        ),
        f"DROP TABLE {MINUTES}",
    ]


MIGRATION = TABLES + ";\n".join(statements("usage")) + ";"
"""Migration 9: the tables, built from the rows already in ``usage``."""


def add(cur: duckdb.DuckDBPyConnection, source: str = STAGE, where: str = "") -> None:
    """Add a loaded segment's rows (the table ``source``) to the rollups, in the caller's
    transaction."""
    for sql in statements(source, where):
        cur.execute(sql)


def forget_user(cur: duckdb.DuckDBPyConnection, user: str) -> None:
    """Delete the user's rows of ``user_days`` (the only rollup that names a user)."""
    cur.execute("DELETE FROM user_days WHERE user_id = ?", [user])


def cut(cur: duckdb.DuckDBPyConnection, before: float) -> None:
    """After the ``usage`` rows before ``before`` (epoch seconds) were deleted, in the same
    transaction: delete the rollup rows of the days before it and of the day it falls in, then
    count that day again from the rows left in ``usage`` (a range scan of one day of rows, once
    per retention pass)."""
    row = cur.execute(
        "SELECT CAST(make_timestamp(CAST(? * 1e6 AS BIGINT)) AS DATE)", [before]
    ).fetchone()
    assert row is not None
    day = row[0].isoformat()  # a date the database gave: safe as SQL text
    start, end = (
        f"CAST(DATE '{day}' AS TIMESTAMP)",
        f"CAST(DATE '{day}' AS TIMESTAMP) + INTERVAL 1 DAY",
    )
    for table in ("usage_minutes", "latency_minutes"):
        cur.execute(f"DELETE FROM {table} WHERE minute < {end}")
    for table in ("usage_days", "user_days"):
        cur.execute(f"DELETE FROM {table} WHERE day <= DATE '{day}'")
    add(cur, "usage", f"WHERE ts >= {start} AND ts < {end}")


def nearest_rank(counts: list[tuple[int, int]], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a histogram, ``(bucket, requests)`` sorted by bucket, as
    ``quantile_disc`` picks it (the ceil(q * n)-th value), in ms; None for no requests."""
    n = sum(c for _, c in counts)
    if n == 0:
        return None
    rank = max(1, math.ceil(n * q - 1e-9))
    seen = 0
    for bucket, c in counts:
        seen += c
        if seen >= rank:
            return bucket_ms(bucket)
    return bucket_ms(counts[-1][0])
