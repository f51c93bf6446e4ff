"""The usage database (DuckDB): schema and migrations, spool ingestion, read-only SQL, invoices.

DuckDB locks its file to one process, so while the gateway runs it is the only way in: the
admin API runs queries here, on cursors of the gateway's own connection, in worker threads. All
money is DECIMAL, computed in SQL from token counts and per-million prices, so sums are exact and
an invoice adds up to the cent.
"""

from __future__ import annotations

import itertools
import threading
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import duckdb
import orjson

from proxy.usage import QueryError, ReadOnlyQuery

MONEY = "DECIMAL(18, 9)"

SPOOL_COLUMNS: dict[str, str] = {
    "ts": "DOUBLE",
    "request_id": "VARCHAR",
    "final": "BOOLEAN",  # only in segments of older versions; every row is final now
    "user_id": "VARCHAR",
    "key_id": "VARCHAR",
    "tier": "VARCHAR",
    "feature": "VARCHAR",
    "endpoint": "VARCHAR",
    "provider": "VARCHAR",
    "model": "VARCHAR",
    "upstream_model": "VARCHAR",
    "stream": "BOOLEAN",
    "status": "INTEGER",
    "error_code": "VARCHAR",
    "cache": "VARCHAR",
    "input_tokens": "BIGINT",
    "output_tokens": "BIGINT",
    "usage_estimated": "BOOLEAN",
    "latency_ms": "DOUBLE",
    "ttfb_ms": "DOUBLE",
    "input_per_mtok": "DOUBLE",
    "output_per_mtok": "DOUBLE",
    "price": "DOUBLE",
    "saved_input": "BIGINT",
    "saved_output": "BIGINT",
    "retries": "INTEGER",
    "client_ip_hash": "VARCHAR",
    "shared": "VARCHAR",
}

# the usage columns after the key, as migration 1 created them (3 rebuilds the table with them)
_USAGE_COLUMNS = f"""user_id VARCHAR, key_id VARCHAR, tier VARCHAR, feature VARCHAR, endpoint VARCHAR,
        provider VARCHAR, model VARCHAR, upstream_model VARCHAR, stream BOOLEAN,
        status INTEGER, error_code VARCHAR, cache VARCHAR,
        input_tokens BIGINT, output_tokens BIGINT, usage_estimated BOOLEAN,
        latency_ms DOUBLE, ttfb_ms DOUBLE,
        cost_usd {MONEY}, price_usd {MONEY}, saved_usd {MONEY},
        retries INTEGER, client_ip_hash VARCHAR, final BOOLEAN"""

MIGRATIONS: list[str] = [
    # 1: the usage table, one row per request (DESIGN §4 columns and more)
    f"""
    CREATE TABLE usage (
        ts TIMESTAMP NOT NULL,
        request_id VARCHAR PRIMARY KEY,
        {_USAGE_COLUMNS}
    );
    CREATE TABLE plans (tier VARCHAR PRIMARY KEY, monthly_cost {MONEY} NOT NULL);
    """,
    # 2: requests answered from another request's provider call (coalesced) or a shared call
    "ALTER TABLE usage ADD COLUMN shared VARCHAR;",
    # 3: no primary key on request_id. Its index cost half of every load (3.9 against 6.7 µs a
    # row, measured) and grew in memory with the table. A row is written to exactly one spool
    # segment, so rows are unique by construction; what must not happen twice is loading a
    # segment (a crash between its commit and its deletion), and that is recorded per segment
    # in spool_loads, in the transaction that loads it.
    f"""
    CREATE TABLE usage_v3 (
        ts TIMESTAMP NOT NULL,
        request_id VARCHAR NOT NULL,
        {_USAGE_COLUMNS}, shared VARCHAR
    );
    INSERT INTO usage_v3 BY NAME SELECT * FROM usage;
    DROP TABLE usage;
    ALTER TABLE usage_v3 RENAME TO usage;
    CREATE TABLE spool_loads (
        segment VARCHAR NOT NULL, rows BIGINT NOT NULL, loaded_at TIMESTAMP NOT NULL
    );
    """,
    # 4: chunks loaded from the usage stream, kept (a chunk may be shipped again any time)
    """
    CREATE TABLE stream_loads (
        segment VARCHAR PRIMARY KEY, rows BIGINT NOT NULL, loaded_at TIMESTAMP NOT NULL
    );
    """,
    # 5: which plans have the sla_guarantee perk (the sla view reports on them)
    "ALTER TABLE plans ADD COLUMN sla BOOLEAN DEFAULT false;",
]

VIEWS = """
-- daily_usage: one row per UTC day, user and feature.
CREATE OR REPLACE VIEW daily_usage AS
SELECT CAST(ts AS DATE) AS day, user_id, tier, feature,
       count(*) AS requests,
       count(*) FILTER (WHERE status < 400) AS ok,
       count(*) FILTER (WHERE cache = 'hit') AS cache_hits,
       sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
       sum(cost_usd) AS cost_usd, sum(price_usd) AS revenue_usd
FROM usage GROUP BY ALL;

-- kpis: the technical metrics, over all recorded traffic.
--   requests_per_second: requests / seconds between the first and last request
--   requests_per_user_per_day: requests / (distinct user-days)
--   cache_hit_rate: hits / requests a cache saw (hit + miss), in percent
--   avg/p95_response_ms: latency of answered requests (status < 400)
--   error_rate: share of requests with status >= 500 or a provider error, in percent
CREATE OR REPLACE VIEW kpis AS
SELECT count(*) AS requests,
       count(*) / greatest(epoch(max(ts)) - epoch(min(ts)), 1) AS requests_per_second,
       count(*) / greatest(count(DISTINCT (user_id, CAST(ts AS DATE))), 1) AS requests_per_user_per_day,
       100.0 * count(*) FILTER (WHERE cache = 'hit')
             / greatest(count(*) FILTER (WHERE cache IN ('hit', 'miss')), 1) AS cache_hit_rate,
       avg(latency_ms) FILTER (WHERE status < 400) AS avg_response_ms,
       quantile_cont(latency_ms, 0.95) FILTER (WHERE status < 400) AS p95_response_ms,
       100.0 * count(*) FILTER (WHERE status >= 500 OR error_code LIKE 'upstream%')
             / greatest(count(*), 1) AS error_rate,
       count(*) FILTER (WHERE status = 429) AS rate_limited,
       count(*) FILTER (WHERE cost_usd IS NULL AND status < 400 AND cache IS DISTINCT FROM 'hit')
             AS unpriced_requests
FROM usage;

-- sla: per UTC month and plan with the sla_guarantee perk (the plan's latency and errors).
--   availability: share of requests not failed by the gateway or a provider (status < 500),
--   in percent; error_rate: the rest; p50/p95_response_ms: answered requests (status < 400)
CREATE OR REPLACE VIEW sla AS
SELECT strftime(u.ts, '%Y-%m') AS month, u.tier, count(*) AS requests,
       100.0 * count(*) FILTER (WHERE u.status < 500) / count(*) AS availability,
       100.0 * count(*) FILTER (WHERE u.status >= 500) / count(*) AS error_rate,
       quantile_cont(u.latency_ms, 0.5) FILTER (WHERE u.status < 400) AS p50_response_ms,
       quantile_cont(u.latency_ms, 0.95) FILTER (WHERE u.status < 400) AS p95_response_ms
FROM usage u JOIN plans p ON p.tier = u.tier
WHERE p.sla
GROUP BY ALL ORDER BY month, tier;

-- business: per UTC month.
--   revenue_usd: usage revenue (sum of price_usd) + subscriptions (monthly_cost of each
--     plan a user was active on in the month)
--   provider_cost_usd: sum of cost_usd (what the providers charge)
--   cost_per_request_usd: provider_cost_usd / requests
--   profit_margin: (revenue - provider cost) / revenue, in percent
--   mrr_usd: monthly recurring revenue = sum of the plan's monthly_cost over users active in
--     the month (a user's plan is the tier of their requests; plan prices from the policy)
--   active_users: users with at least one request in the month (requests refused before a
--     user was known, such as a bad key's 401, count as requests but not as a user)
--   churned_users / churn_rate: users active last month and not this month, / last month's
--   customer_lifetime_value_usd: average revenue per active user / churn rate (monthly)
CREATE OR REPLACE VIEW business AS
WITH months AS (
    SELECT strftime(ts, '%Y-%m') AS month, user_id, any_value(tier) AS tier,
           count(*) AS requests, sum(price_usd) AS usage_revenue, sum(cost_usd) AS cost
    FROM usage GROUP BY ALL
),
plans AS (
    SELECT m.*, coalesce(p.monthly_cost, 0) AS monthly_cost
    FROM months m LEFT JOIN plans p ON p.tier = m.tier
),
per_month AS (
    SELECT month, count(user_id) AS active_users, sum(requests) AS requests,
           sum(usage_revenue) AS usage_revenue_usd, sum(monthly_cost) AS mrr_usd,
           sum(cost) AS provider_cost_usd
    FROM plans GROUP BY month
),
churn AS (
    SELECT cur.month,
           (SELECT count(*) FROM months p
            WHERE p.month = strftime(CAST(cur.month || '-01' AS DATE) - INTERVAL 1 MONTH, '%Y-%m')
              AND p.user_id IS NOT NULL
              AND p.user_id NOT IN (SELECT user_id FROM months c
                                    WHERE c.month = cur.month AND c.user_id IS NOT NULL))
             AS churned_users,
           (SELECT count(*) FROM months p
            WHERE p.month = strftime(CAST(cur.month || '-01' AS DATE) - INTERVAL 1 MONTH, '%Y-%m')
              AND p.user_id IS NOT NULL)
             AS previous_users
    FROM per_month cur
)
SELECT p.month, p.requests, p.active_users,
       p.usage_revenue_usd + p.mrr_usd AS revenue_usd,
       p.usage_revenue_usd, p.mrr_usd,
       coalesce(p.provider_cost_usd, 0) AS provider_cost_usd,
       coalesce(p.provider_cost_usd, 0) / greatest(p.requests, 1) AS cost_per_request_usd,
       CASE WHEN p.usage_revenue_usd + p.mrr_usd > 0
            THEN 100 * (p.usage_revenue_usd + p.mrr_usd - coalesce(p.provider_cost_usd, 0))
                 / (p.usage_revenue_usd + p.mrr_usd) END AS profit_margin,
       c.churned_users,
       CASE WHEN c.previous_users > 0 THEN 100.0 * c.churned_users / c.previous_users END
           AS churn_rate,
       CASE WHEN c.previous_users > 0 AND c.churned_users > 0
            THEN ((p.usage_revenue_usd + p.mrr_usd) / p.active_users)
                 / (c.churned_users / c.previous_users) END AS customer_lifetime_value_usd
FROM per_month p JOIN churn c USING (month)
ORDER BY p.month;
"""

_COLUMNS = ", ".join(f"'{k}': '{v}'" for k, v in SPOOL_COLUMNS.items())
_INGEST = f"""
INSERT INTO usage BY NAME
SELECT make_timestamp(CAST(ts * 1000000 AS BIGINT)) AS ts, request_id,
       coalesce(final, true) AS final, user_id,
       key_id, tier, feature, endpoint, provider, model, upstream_model, stream, status,
       error_code, cache, input_tokens, output_tokens, usage_estimated, latency_ms,
       ttfb_ms, retries, client_ip_hash, shared,
       CASE WHEN cache = 'hit' OR shared = 'coalesced' THEN CAST(0 AS {MONEY})
            WHEN input_per_mtok IS NULL
                 OR (output_tokens > 0 AND output_per_mtok IS NULL) THEN NULL
            ELSE CAST((input_tokens * CAST(input_per_mtok AS {MONEY})
                      + output_tokens * CAST(coalesce(output_per_mtok, 0) AS {MONEY}))
                      / 1000000 AS {MONEY}) END AS cost_usd,
       CAST(coalesce(price, 0) AS {MONEY}) AS price_usd,
       CASE WHEN input_per_mtok IS NULL THEN NULL
            ELSE CAST((coalesce(saved_input, 0) * CAST(input_per_mtok AS {MONEY})
                      + coalesce(saved_output, 0)
                        * CAST(coalesce(output_per_mtok, 0) AS {MONEY}))
                      / 1000000 AS {MONEY}) END AS saved_usd
FROM read_json(?, format='newline_delimited', columns={{{_COLUMNS}}}, ignore_errors=true)
WHERE request_id IS NOT NULL
"""


def _segment_id(segment: Path) -> str | None:
    """A segment's identity: the request id of its first complete row (None: no rows).

    Only the first lines are read: DuckDB reads the segment itself.
    """
    with segment.open("rb") as f:
        for line in itertools.islice(f, 8):
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("request_id"), str):
                return row["request_id"]  # type: ignore[no-any-return]
    return None


_READ_ONLY = {"SELECT", "EXPLAIN", "PRAGMA", "SHOW", "DESCRIBE"}
_CENT = Decimal("0.01")


class UsageDB:
    """One DuckDB database, one writer connection; readers use cursors in worker threads."""

    def __init__(self, path: str | Path, memory_limit: str = "512MB") -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # one DuckDB thread: the loader must not compete with the event loop for the CPU; a
        # memory cap, since DuckDB's default (80% of RAM) is meant for a database server
        self.con = duckdb.connect(self.path, config={"threads": 1, "memory_limit": memory_limit})
        self._write_lock = threading.Lock()
        self.migrate()

    def migrate(self) -> int:
        """Apply pending migrations in order; the applied version is recorded in a table."""
        con = self.con
        con.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
            "applied_at TIMESTAMP NOT NULL)"
        )
        row = con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
        current = int(row[0]) if row else 0
        for version, sql in enumerate(MIGRATIONS, start=1):
            if version <= current:
                continue
            con.execute("BEGIN")
            con.execute(sql)
            con.execute("INSERT INTO schema_version VALUES (?, now())", [version])
            con.execute("COMMIT")
            current = version
        con.execute(VIEWS)
        return current

    def ingest(self, segment: Path, *, stream: bool = False) -> int:
        """Load one spool segment and delete it; loading a segment twice adds nothing.

        ``stream``: the segment is a chunk from the usage stream (``plugins.usage_stream``),
        whose copy may come again at any later time (a gateway killed after shipping ships it
        again), so its marker is kept, in ``stream_loads``, instead of deleted.

        The segment is known by its first row's request id (request ids are unique and a row is
        in one segment only). Its rows and a marker in ``spool_loads`` commit together; the file
        is deleted after the commit and the marker after the file, so a crash at any point
        leaves either the file and no rows, or the rows, the marker and perhaps the file, which
        the next load recognises and deletes. Returns the rows loaded from the segment (the first
        time); a torn last line (a killed process) is skipped.
        """
        mark = _segment_id(segment)
        marks = "stream_loads" if stream else "spool_loads"
        rows = 0
        if mark is not None:
            with self._write_lock:
                cur = self.con.cursor()
                try:
                    cur.execute("BEGIN")
                    done = cur.execute(
                        f"SELECT rows FROM {marks} WHERE segment = ?", [mark]
                    ).fetchone()
                    if done is not None:
                        rows = int(done[0])
                    else:
                        inserted = cur.execute(_INGEST, [str(segment)]).fetchone()
                        rows = int(inserted[0]) if inserted else 0
                        cur.execute(f"INSERT INTO {marks} VALUES (?, ?, now())", [mark, rows])
                    cur.execute("COMMIT")
                except Exception:
                    cur.execute("ROLLBACK")
                    raise
                finally:
                    cur.close()
        segment.unlink(missing_ok=True)
        if mark is not None and not stream:
            with self._write_lock:
                self.con.execute("DELETE FROM spool_loads WHERE segment = ?", [mark])
        return rows

    def set_plan_prices(self, prices: dict[str, float], sla: frozenset[str] = frozenset()) -> None:
        """Record each plan's monthly cost (the policy's), used by MRR and invoices, and
        whether it has the sla_guarantee perk (the ``sla`` view)."""
        with self._write_lock:
            for tier, cost in prices.items():
                self.con.execute(
                    f"INSERT INTO plans (tier, monthly_cost, sla) VALUES (?, CAST(? AS {MONEY}), ?) "
                    "ON CONFLICT (tier) DO UPDATE SET monthly_cost = excluded.monthly_cost, "
                    "sla = excluded.sla",
                    [tier, cost, tier in sla],
                )

    def query(self, sql: str) -> tuple[list[str], list[list[Any]]]:
        """Run read-only SQL on a fresh cursor; raises ReadOnlyQuery or QueryError."""
        cur = self.con.cursor()
        try:
            statements = cur.extract_statements(sql)
            if not statements:
                raise QueryError("empty query")
            for st in statements:
                if st.type.name not in _READ_ONLY:
                    raise ReadOnlyQuery(f"only reads are allowed, not {st.type.name}")
            result = cur.execute(sql)
            columns = [d[0] for d in result.description or []]
            rows = [list(r) for r in result.fetchall()]
            return columns, rows
        except duckdb.Error as e:
            raise QueryError(str(e)) from None
        finally:
            cur.close()

    def invoice(
        self,
        user: str,
        month: str,
        plan_costs: dict[str, float] | None = None,
        current_tier: str | None = None,
    ) -> dict[str, Any]:
        """The month's invoice: the plan's subscription line plus usage lines, exact to the cent.

        Usage lines group billable requests (status < 400, cache hits included) by service,
        endpoint, feature and unit price. The same inputs always give the same invoice.
        """
        start = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC)
        end = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
        cur = self.con.cursor()
        try:
            rows = cur.execute(
                """
                SELECT endpoint, coalesce(feature, '-') AS feature, price_usd AS unit,
                       count(*) AS qty, sum(price_usd) AS total
                FROM usage
                WHERE user_id = ? AND ts >= ? AND ts < ? AND status < 400
                GROUP BY ALL ORDER BY endpoint, feature, unit
                """,
                [user, start.replace(tzinfo=None), end.replace(tzinfo=None)],
            ).fetchall()
            tier_row = cur.execute(
                "SELECT tier FROM usage WHERE user_id = ? AND ts >= ? AND ts < ? "
                "AND tier IS NOT NULL ORDER BY ts DESC LIMIT 1",
                [user, start.replace(tzinfo=None), end.replace(tzinfo=None)],
            ).fetchone()
            if plan_costs is None:  # offline: the plan prices recorded by the last gateway run
                plan_costs = {
                    t: float(c)
                    for t, c in cur.execute("SELECT tier, monthly_cost FROM plans").fetchall()
                }
        finally:
            cur.close()
        tier = tier_row[0] if tier_row else current_tier
        lines: list[dict[str, Any]] = []
        if tier is not None:
            cost = Decimal(str(plan_costs.get(tier, 0)))
            lines.append(_line(f"{tier} plan, {month}", "subscription", None, None, 1, cost, cost))
        for endpoint, feature, unit, qty, total in rows:
            lines.append(
                _line(
                    f"AI API: {endpoint} / {feature}",
                    "ai_api",
                    endpoint,
                    feature,
                    int(qty),
                    Decimal(unit),
                    Decimal(total),
                )
            )
        grand = sum((Decimal(x["total"]) for x in lines), Decimal(0))
        return {
            "user": user,
            "month": month,
            "tier": tier,
            "currency": "USD",
            "period": {"start": start.date().isoformat(), "end": end.date().isoformat()},
            "lines": lines,
            "total": str(grand.quantize(_CENT, ROUND_HALF_UP)),
        }

    def export_parquet(self, folder: str) -> int:
        """Write the usage table as Parquet files partitioned by UTC day (``day=YYYY-MM-DD``)."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        with self._write_lock:
            cur = self.con.cursor()
            try:
                row = cur.execute("SELECT count(*) FROM usage").fetchone()
                escaped = folder.replace("'", "''")
                cur.execute(
                    f"COPY (SELECT *, CAST(ts AS DATE) AS day FROM usage) TO '{escaped}' "
                    "(FORMAT parquet, PARTITION_BY (day), OVERWRITE_OR_IGNORE)"
                )
            finally:
                cur.close()
        return int(row[0]) if row else 0

    def delete_rows(self, user: str | None = None, before: float | None = None) -> int:
        """Delete a user's usage rows, or rows older than ``before`` (epoch seconds); returns
        how many. A deletion request and data retention (the usage table holds no prompt text,
        but user ids and hashed addresses are personal data)."""
        if (user is None) == (before is None):
            raise ValueError("delete_rows needs exactly one of user and before")
        with self._write_lock:
            cur = self.con.cursor()
            try:
                if user is not None:
                    row = cur.execute("DELETE FROM usage WHERE user_id = ?", [user]).fetchone()
                else:
                    row = cur.execute(
                        "DELETE FROM usage WHERE ts < make_timestamp(CAST(? * 1e6 AS BIGINT))",
                        [before],
                    ).fetchone()
            finally:
                cur.close()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self.con.close()


def _money(value: Decimal, places: str = "0.01") -> str:
    return str(value.quantize(Decimal(places), ROUND_HALF_UP))


def _line(
    description: str,
    service: str,
    endpoint: str | None,
    feature: str | None,
    qty: int,
    unit: Decimal,
    total: Decimal,
) -> dict[str, Any]:
    unit_s = format(unit.normalize(), "f") if unit else "0"
    return {
        "description": description,
        "service": service,
        "endpoint": endpoint,
        "feature": feature,
        "quantity": qty,
        "unit_price": unit_s,
        "total": _money(total),
    }
