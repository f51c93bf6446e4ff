"""The usage database (DuckDB): schema and migrations, spool ingestion, read-only SQL, invoices.

DuckDB locks its file to one process, so while the gateway runs it is the only way in: the
admin API runs queries here, on cursors of the gateway's own connection, in worker threads. All
money is DECIMAL, computed in SQL from token counts and per-million prices, so sums are exact and
an invoice adds up to the cent.

Admin SQL is arbitrary text from whoever holds the admin key, and DuckDB can read and write
files, load extensions and change its own settings. So a query can only read the usage
database, by three independent walls: DuckDB's parser must find exactly one SELECT (or EXPLAIN
[ANALYZE] of one), it runs in a READ ONLY transaction, and the database itself is opened
sandboxed: external access off (no file, URL or environment outside ``file_dirs``, the folders
the gateway's own loads and exports use), no extension install or autoload, and the
configuration locked, so no statement can undo any of it.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import duckdb
import orjson

from plugins.metering import rollups
from plugins.metering.billing import PlanTerms, overage, plan_days, subscription_lines
from proxy.analytics import QueryError, QueryTimeout, ReadOnlyQuery, ResultTooLarge, json_default

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
    "upstream_request_id": "VARCHAR",  # absent from older segments: NULL
    "labels": "MAP(VARCHAR, VARCHAR)",  # the key's labels; absent from older segments: NULL
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
    # 5: which tiers have the sla_guarantee perk (the sla view reports on them)
    "ALTER TABLE plans ADD COLUMN sla BOOLEAN DEFAULT false;",
    # 6: the provider's id of the call that answered (support tickets); NULL for older rows
    "ALTER TABLE usage ADD COLUMN upstream_request_id VARCHAR;",
    # 7: the labels of the key that made the request (project=web ...): labels['project'] in SQL
    "ALTER TABLE usage ADD COLUMN labels MAP(VARCHAR, VARCHAR);",
    # 8: each tier's quota and overage prices (NULL: no overage), so an invoice rendered from
    # the file alone (`tollway invoice --db`) bills overage as the gateway and the meter do
    f"""
    ALTER TABLE plans ADD COLUMN quota BIGINT;
    ALTER TABLE plans ADD COLUMN overage_per_request {MONEY};
    ALTER TABLE plans ADD COLUMN overage_per_mtok {MONEY};
    """,
    # 9: per-minute, per-day and per-user-day rollups for the dashboard, kept in the load's
    # transaction (plugins.metering.rollups), built here from the rows already loaded
    rollups.MIGRATION,
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

-- sla: per UTC month and tier with the sla_guarantee perk (the tier's latency and errors).
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
--     tier a user was active on in the month)
--   provider_cost_usd: sum of cost_usd (what the providers charge)
--   cost_per_request_usd: provider_cost_usd / requests
--   profit_margin: (revenue - provider cost) / revenue, in percent
--   mrr_usd: monthly recurring revenue = sum of the tier's monthly_cost over users active in
--     the month (a user's tier is the tier of their requests; tier prices from the policy)
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
# a segment's rows as usage rows, read once into a temporary table: usage and the rollups are
# inserted from it (reading the JSON again would cost as much as the insert). A row whose time
# is missing, not a number or outside years 1970-9999 (a segment written by hand or damaged)
# takes the load's time: failing the whole segment would hold back every row after it
_STAGE = f"""
CREATE TEMP TABLE {rollups.STAGE} AS
SELECT make_timestamp(CAST(coalesce(CASE WHEN ts >= 0 AND ts < 253402300800 THEN ts END,
                                     epoch(now())) * 1000000 AS BIGINT)) AS ts, request_id,
       coalesce(final, true) AS final, user_id,
       key_id, tier, feature, endpoint, provider, model, upstream_model, stream, status,
       error_code, cache, input_tokens, output_tokens, usage_estimated, latency_ms,
       ttfb_ms, retries, client_ip_hash, shared, upstream_request_id, labels,
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


_CENT = Decimal("0.01")
_SELECT = duckdb.StatementType.SELECT
_EXPLAIN = duckdb.StatementType.EXPLAIN
_COMMENT = duckdb.token_type.comment
_FETCH = 1000
"""Rows converted to Python at a time while the row and byte limits are counted."""


def _explained(query: str) -> str | None:
    """The statement an ``EXPLAIN [ANALYZE] <statement>`` explains (None: EXPLAIN options).

    Found with DuckDB's own tokenizer (comments skipped), so the text checked is the text run.
    """
    starts = [pos for pos, kind in duckdb.tokenize(query) if kind != _COMMENT]
    words = [query[a:b].strip().upper() for a, b in itertools.pairwise([*starts, len(query)])]
    if len(words) < 2 or words[0] != "EXPLAIN":
        return None
    at = 2 if words[1] in ("ANALYZE", "ANALYSE") else 1
    if at >= len(starts) or words[at].startswith("("):
        return None
    return query[starts[at] :]


def read_statement(cur: duckdb.DuckDBPyConnection, sql: str) -> duckdb.Statement:
    """The one statement of ``sql``, if it can only read; else ReadOnlyQuery or QueryError.

    EXPLAIN ANALYZE runs what it explains, so an EXPLAIN passes only when DuckDB parses what
    it explains as one SELECT. PRAGMA, SET, CALL, ATTACH, COPY, LOAD and the rest are refused
    by type; a SELECT's own table functions are bounded by the sandbox (see the module doc).
    """
    statements = cur.extract_statements(sql)
    if not statements:
        raise QueryError("empty query")
    for st in statements:
        if st.type == _EXPLAIN:
            inner = _explained(st.query)
            explained = cur.extract_statements(inner) if inner is not None else []
            if len(explained) != 1 or explained[0].type != _SELECT:
                raise ReadOnlyQuery("only reads are allowed: EXPLAIN takes one SELECT")
        elif st.type != _SELECT:
            raise ReadOnlyQuery(f"only reads are allowed, not {st.type.name}")
    if len(statements) > 1:
        raise QueryError("one statement per query")
    return statements[0]


def _dir_prefix(folder: str | Path) -> str:
    """A folder as DuckDB's allowed_directories matches it: absolute, with a final slash (so
    that ``/data/x`` does not also let ``/data/xy`` through)."""
    return os.path.join(os.path.realpath(folder), "")


class UsageDB:
    """One DuckDB database, one writer connection; readers use cursors in worker threads.

    The only folders DuckDB may read or write files in are ``spool_dir`` (segments to load;
    default DATABASE.spool) and ``export_dirs``; everything else on the host is out of reach
    of any SQL, ours or an admin's. ``temp_limit`` bounds what queries may spill to disk.
    """

    def __init__(
        self,
        path: str | Path,
        memory_limit: str = "512MB",
        *,
        spool_dir: str | Path | None = None,
        export_dirs: Iterable[str | Path] = (),
        temp_limit: str = "1GB",
    ) -> None:
        self.path = str(path)
        self.spool_dir: Path | None = None
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self.spool_dir = Path(spool_dir or Path(self.path).with_suffix(".spool"))
        elif spool_dir is not None:
            self.spool_dir = Path(spool_dir)
        file_dirs = [*([self.spool_dir] if self.spool_dir else []), *export_dirs]
        # one DuckDB thread: the loader must not compete with the event loop for the CPU; a
        # memory cap, since DuckDB's default (80% of RAM) is meant for a database server
        self.con = duckdb.connect(
            self.path,
            config={
                "threads": 1,
                "memory_limit": memory_limit,
                "max_temp_directory_size": temp_limit,
                "autoinstall_known_extensions": False,
                "autoload_known_extensions": False,
                "allow_community_extensions": False,
                # the one setting a query cursor changes (its own memory cap) once locked
                "allowed_configs": ["operator_memory_limit"],
            },
        )
        self.file_dirs = sorted({_dir_prefix(d) for d in file_dirs})
        self._write_lock = threading.Lock()
        self.migrate()
        self._sandbox()

    def _sandbox(self) -> None:
        """External access off but for ``file_dirs``, then the configuration locked.

        DuckDB accepts allowed_directories only once the database runs, and nothing can turn
        access back on after it is off, so this is the last step of opening. DuckDB shares one
        database per file within a process: a second UsageDB on an open file finds it locked,
        and must not need folders the first did not allow.
        """
        con = self.con
        row = con.execute(
            "SELECT current_setting('lock_configuration'), current_setting('allowed_directories')"
        ).fetchone()
        if row is not None and row[0]:
            missing = set(self.file_dirs) - set(row[1] or [])
            if missing:
                raise RuntimeError(
                    f"{self.path} is already open in this process without access to "
                    f"{sorted(missing)}"
                )
            return
        listed = ", ".join("'" + d.replace("'", "''") + "'" for d in self.file_dirs)
        con.execute(f"SET allowed_directories = [{listed}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")

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

        ``stream``: the segment is a chunk from the usage stream (``plugins.metering.stream``),
        whose copy may come again at any later time (a gateway killed after shipping ships it
        again), so its marker is kept, in ``stream_loads``, instead of deleted.

        The segment is known by its first row's request id (request ids are unique and a row is
        in one segment only). Its rows and a marker in ``spool_loads`` commit together; the file
        is deleted after the commit and the marker after the file, so a crash at any point
        leaves either the file and no rows, or the rows, the marker and perhaps the file, which
        the next load recognises and deletes. Returns the rows this call added: 0 for a segment
        loaded before, so a counter summing the returns counts each row once however often its
        segment comes (a stream chunk shipped again, a spool segment after a crash); a torn last
        line (a killed process) is skipped.
        """
        try:
            mark = _segment_id(segment)
        except FileNotFoundError:
            # loaded and deleted by a load that was still running when this one was queued
            # (a flush cancelled at shutdown leaves its load running): nothing left to do
            return 0
        marks = "stream_loads" if stream else "spool_loads"
        rows = 0
        if mark is not None:
            with self._write_lock:
                cur = self.con.cursor()
                try:
                    cur.execute("BEGIN")
                    done = cur.execute(
                        f"SELECT 1 FROM {marks} WHERE segment = ?", [mark]
                    ).fetchone()
                    if done is None:  # resolved: allowed_directories compares the path as given
                        cur.execute(_STAGE, [os.path.realpath(segment)])
                        inserted = cur.execute(
                            f"INSERT INTO usage BY NAME SELECT * FROM {rollups.STAGE}"
                        ).fetchone()
                        rows = int(inserted[0]) if inserted else 0
                        rollups.add(cur, rollups.STAGE)
                        cur.execute(f"DROP TABLE {rollups.STAGE}")
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

    def set_tier_prices(
        self,
        prices: dict[str, float],
        sla: frozenset[str] = frozenset(),
        terms: Mapping[str, PlanTerms] | None = None,
    ) -> None:
        """Record each tier's monthly cost (the policy's), used by MRR and invoices, whether
        it has the sla_guarantee perk (the ``sla`` view), and its quota and overage prices
        (``terms``: what an invoice rendered offline bills, see ``recorded_terms``)."""
        terms = terms or {}
        with self._write_lock:
            for tier, cost in prices.items():
                t = terms.get(tier)
                self.con.execute(
                    "INSERT INTO plans (tier, monthly_cost, sla, quota, overage_per_request, "
                    f"overage_per_mtok) VALUES (?, CAST(? AS {MONEY}), ?, ?, "
                    f"CAST(? AS {MONEY}), CAST(? AS {MONEY})) "
                    "ON CONFLICT (tier) DO UPDATE SET monthly_cost = excluded.monthly_cost, "
                    "sla = excluded.sla, quota = excluded.quota, "
                    "overage_per_request = excluded.overage_per_request, "
                    "overage_per_mtok = excluded.overage_per_mtok",
                    [
                        tier,
                        cost,
                        tier in sla,
                        t.quota if t else None,
                        str(t.per_request) if t else None,
                        str(t.per_mtok) if t else None,
                    ],
                )

    @staticmethod
    def recorded_terms(cur: duckdb.DuckDBPyConnection) -> dict[str, PlanTerms]:
        """The tiers' overage terms as the last gateway or meter run recorded them."""
        rows = cur.execute(
            "SELECT tier, quota, overage_per_request, overage_per_mtok FROM plans "
            "WHERE quota IS NOT NULL AND overage_per_request IS NOT NULL"
        ).fetchall()
        return {t: PlanTerms(int(q), float(r), float(m or 0)) for t, q, r, m in rows}

    def query(
        self,
        sql: str,
        *,
        cur: duckdb.DuckDBPyConnection | None = None,
        max_rows: int | None = None,
        max_bytes: int | None = None,
        memory_limit: str | None = None,
    ) -> tuple[list[str], list[list[Any]]]:
        """Run one read-only statement; raises ReadOnlyQuery, QueryError or its subclasses
        QueryTimeout (interrupted) and ResultTooLarge (over ``max_rows`` or ``max_bytes`` of
        JSON). ``cur``: the caller's cursor (so another thread can interrupt it), else a new
        one. ``memory_limit``: DuckDB's cap on this query's intermediates."""
        own = cur is None
        c = self.con.cursor() if cur is None else cur
        try:
            statement = read_statement(c, sql)
            if memory_limit is not None:
                c.execute(f"SET operator_memory_limit = '{memory_limit}'")
            c.execute("BEGIN TRANSACTION READ ONLY")
            try:
                c.execute(statement)
                columns = [d[0] for d in c.description or []]
                rows = _fetch(c, max_rows, max_bytes)
            finally:
                c.execute("ROLLBACK")
            return columns, rows
        except duckdb.InterruptException:
            raise QueryTimeout("the query was interrupted") from None
        except duckdb.Error as e:
            raise QueryError(str(e)) from None
        finally:
            if own:
                c.close()

    def invoice(
        self,
        user: str,
        month: str,
        tier_costs: dict[str, float] | None = None,
        current_tier: str | None = None,
        terms: Mapping[str, PlanTerms] | None = None,
        cur: duckdb.DuckDBPyConnection | None = None,
    ) -> dict[str, Any]:
        """The month's invoice: the tier's subscription line plus usage lines, exact to the cent.

        Usage lines group billable requests (status < 400, cache hits included) by service,
        endpoint, feature and unit price. The same inputs always give the same invoice.
        ``terms``: the tiers' quotas and overage prices (``plugins.metering.billing``: overage
        lines, and the subscription prorated by days when the plan changed in the month);
        None (offline): those the last gateway or meter run recorded (``set_tier_prices``), as
        for ``tier_costs``, so the file alone gives the invoice a running process gives.
        """
        start = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC)
        end = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
        own = cur is None
        cur = self.con.cursor() if cur is None else cur
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
            days = plan_days(cur, user, start, end)
            if terms is None:  # offline: the tiers' terms recorded by the last gateway run
                terms = self.recorded_terms(cur)
            over = overage(cur, user, start, end, terms) if terms else []
            if tier_costs is None:  # offline: the tier prices recorded by the last gateway run
                tier_costs = {
                    t: float(c)
                    for t, c in cur.execute("SELECT tier, monthly_cost FROM plans").fetchall()
                }
        finally:
            if own:
                cur.close()
        tier = tier_row[0] if tier_row else current_tier
        lines: list[dict[str, Any]] = []
        for text, cost in subscription_lines(
            days or ([(tier, 1)] if tier else []), month, tier_costs
        ):
            lines.append(_line(text, "subscription", None, None, 1, cost, cost))
        for plan, included, past, tokens in over:
            t = (terms or {})[plan]
            lines.append(
                _line(
                    f"{plan} plan quota: {included} of {t.quota} requests included",
                    "quota",
                    None,
                    None,
                    included,
                    Decimal(0),
                    Decimal(0),
                )
            )
            if past:
                unit = Decimal(str(t.per_request))
                lines.append(
                    _line(
                        f"Overage: {past} requests past the {plan} plan's quota",
                        "overage",
                        None,
                        None,
                        past,
                        unit,
                        unit * past,
                    )
                )
            if past and t.per_mtok:
                per_token = Decimal(str(t.per_mtok)) / 1_000_000
                lines.append(
                    _line(
                        f"Overage: {tokens} tokens of requests past the {plan} plan's quota",
                        "overage_tokens",
                        None,
                        None,
                        tokens,
                        per_token,
                        per_token * tokens,
                    )
                )
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

    def export_parquet(
        self, folder: str | Path, cur: duckdb.DuckDBPyConnection | None = None
    ) -> int:
        """Write the usage table as Parquet files partitioned by UTC day (``day=YYYY-MM-DD``).

        ``folder`` must be inside ``file_dirs`` (DuckDB refuses any other). The count and the
        files come from one transaction's snapshot, so they agree without holding the write
        lock: loading goes on while an export runs.
        """
        Path(folder).mkdir(parents=True, exist_ok=True)
        path = os.path.realpath(folder)
        own = cur is None
        cur = self.con.cursor() if cur is None else cur
        try:
            cur.execute("BEGIN TRANSACTION READ ONLY")
            try:
                row = cur.execute("SELECT count(*) FROM usage").fetchone()
                escaped = path.replace("'", "''")
                cur.execute(
                    f"COPY (SELECT *, CAST(ts AS DATE) AS day FROM usage) TO '{escaped}' "
                    "(FORMAT parquet, PARTITION_BY (day), OVERWRITE_OR_IGNORE)"
                )
            finally:
                cur.execute("ROLLBACK")
        finally:
            if own:
                cur.close()
        return int(row[0]) if row else 0

    def delete_rows(self, user: str | None = None, before: float | None = None) -> int:
        """Delete a user's usage rows, or rows older than ``before`` (epoch seconds); returns
        how many. A deletion request and data retention (the usage table holds no prompt text,
        but user ids and hashed addresses are personal data). The rollups follow in the same
        transaction: a user's ``user_days`` go (the per-minute counts name no user and stay);
        retention deletes the rollups' minutes and days before ``before`` as well."""
        if (user is None) == (before is None):
            raise ValueError("delete_rows needs exactly one of user and before")
        with self._write_lock:
            cur = self.con.cursor()
            try:
                cur.execute("BEGIN")
                if user is not None:
                    row = cur.execute("DELETE FROM usage WHERE user_id = ?", [user]).fetchone()
                    rollups.forget_user(cur, user)
                else:
                    row = cur.execute(
                        "DELETE FROM usage WHERE ts < make_timestamp(CAST(? * 1e6 AS BIGINT))",
                        [before],
                    ).fetchone()
                    rollups.cut(cur, float(before or 0))
                cur.execute("COMMIT")
            except Exception:
                cur.execute("ROLLBACK")
                raise
            finally:
                cur.close()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self.con.close()


def _fetch(
    cur: duckdb.DuckDBPyConnection, max_rows: int | None, max_bytes: int | None
) -> list[list[Any]]:
    """The result's rows, refused once past ``max_rows`` or ``max_bytes`` of JSON.

    The result streams from DuckDB, so a query that would return a billion rows stops after
    the first ``max_rows + 1``; the bytes are counted as the admin API will encode them.
    """
    rows: list[list[Any]] = []
    size = 0
    while chunk := cur.fetchmany(_FETCH):
        rows.extend(list(r) for r in chunk)
        if max_rows is not None and len(rows) > max_rows:
            raise ResultTooLarge(
                f"the result has more than {max_rows} rows (query_max_rows): aggregate, "
                "or add LIMIT"
            )
        if max_bytes is not None:
            size += len(orjson.dumps(chunk, default=json_default, option=orjson.OPT_NON_STR_KEYS))
            if size > max_bytes:
                raise ResultTooLarge(
                    f"the result is larger than {max_bytes} bytes (query_max_bytes): select "
                    "fewer columns or rows"
                )
    return rows


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
