"""``tollway sql``, ``invoice``, ``report`` and ``export``: reading the usage database.

They go through the running gateway's admin API (``--url``), since the gateway holds the
database open; with ``--db`` they open a stopped gateway's database file directly, after
loading the rows its spool still holds. DuckDB comes in with the metering plugin's modules
(``plugins.metering.database``, ``plugins.metering.spool``), imported inside ``_offline_db`` so that
``import proxy.cli`` does not load it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from proxy.cli.keys import _admin


def _offline_db(path: str, export_dir: str | None = None) -> Any:
    """Open a stopped gateway's usage database, loading rows its spool still holds.

    Sandboxed as the gateway opens it (SQL reads the usage tables and nothing else on the
    host); ``export_dir``: the one folder an export may write to.
    """
    from plugins.metering.database import UsageDB
    from plugins.metering.spool import Spool

    try:
        db = UsageDB(path, export_dirs=[export_dir] if export_dir else [])
    except Exception as e:  # duckdb raises IOException when the gateway holds the lock
        raise SystemExit(f"cannot open {path}: {e}\n(is the gateway running? use --url)") from None
    spool_dir = Path(path).with_suffix(".spool")
    if spool_dir.is_dir():
        spool = Spool(spool_dir)
        spool.rotate()
        for segment in spool.closed():
            db.ingest(segment)  # and deletes it
        spool.close()
    return db


def _query(args: argparse.Namespace, sql: str) -> tuple[list[str], list[list[Any]]]:
    if args.db:
        from proxy.usage import ReadOnlyQuery

        db = _offline_db(args.db)
        try:
            return db.query(sql)  # type: ignore[no-any-return]
        except ReadOnlyQuery as e:
            raise SystemExit(f"refused: {e}") from None
        except Exception as e:
            raise SystemExit(f"SQL error: {e}") from None
        finally:
            db.close()
    out = _admin(args.url, "POST", "/admin/sql", {"query": sql})
    return out["columns"], out["rows"]


def _print_table(columns: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in columns]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for n, row in enumerate(cells):
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def cmd_sql(args: argparse.Namespace) -> int:
    columns, rows = _query(args, args.query)
    if args.json:
        print(orjson.dumps({"columns": columns, "rows": rows}, default=str).decode())
    else:
        _print_table(columns, rows)
    return 0


def cmd_invoice(args: argparse.Namespace) -> int:
    from proxy.usage import invoice_csv

    if args.db:
        db = _offline_db(args.db)
        try:
            invoice = db.invoice(args.user, args.month)
        finally:
            db.close()
    else:
        invoice = _admin(args.url, "GET", f"/admin/invoices/{args.user}?month={args.month}")
    if args.format == "csv":
        sys.stdout.write(invoice_csv(invoice))
    else:
        print(orjson.dumps(invoice, option=orjson.OPT_INDENT_2).decode())
    return 0


_TARGETS = (
    ("cache_hit_rate", "cache hit rate (%)", ">", 50.0),
    ("avg_response_ms", "average response (ms)", "<", 500.0),
    ("error_rate", "error rate (%)", "<", 1.0),
)


def cmd_report(args: argparse.Namespace) -> int:
    columns, rows = _query(args, "SELECT * FROM kpis")
    kpis = dict(zip(columns, rows[0], strict=True)) if rows else {}
    print("Technical KPIs")
    for name in columns:
        print(f"  {name:28} {_fmt(kpis.get(name))}")
    print("\nTargets")
    for name, label, op, target in _TARGETS:
        value = kpis.get(name)
        if value is None:
            verdict = "no data"
        else:
            ok = float(value) > target if op == ">" else float(value) < target
            verdict = "MET" if ok else "MISSED"
        print(f"  {label:28} {_fmt(value):>12}  target {op} {target:g}  {verdict}")
    columns, rows = _query(args, "SELECT * FROM business ORDER BY month")
    print("\nBusiness (per month)")
    _print_table(columns, [[_fmt(v) for v in r] for r in rows])
    columns, rows = _query(args, "SELECT * FROM sla")
    if rows:
        print("\nSLA (plans with sla_guarantee, per month)")
        _print_table(columns, [[_fmt(v) for v in r] for r in rows])
    return 0


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{f:,.4f}".rstrip("0").rstrip(".") if f != int(f) else f"{int(f):,}"


def cmd_export(args: argparse.Namespace) -> int:
    if args.db:  # this machine's files, as the user running the command: any local folder
        folder = str(Path(args.parquet).resolve())
        db = _offline_db(args.db, folder)
        try:
            rows = db.export_parquet(folder)
        finally:
            db.close()
    else:  # the gateway writes only under its metering export_dir: DIR is a name there
        out = _admin(args.url, "POST", "/admin/export", {"dir": args.parquet})
        folder, rows = out["path"], out["rows"]
    print(f"exported {rows} rows to {folder} (Parquet, partitioned by day)")
    return 0
