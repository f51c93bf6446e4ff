"""``tollway sql``, ``invoice``, ``report`` and ``export``: reading the usage database.

They read through a usage source. The core's is the running gateway's admin API (``--url``,
or a ``tollway meter``'s), since the gateway holds the database open. A plugin adds another
with ``add_usage_source`` in its ``register_commands`` hook: the metering plugin's ``--db``
opens a stopped gateway's database file directly. So the core knows no database, and
``import proxy.cli`` loads no DuckDB.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from proxy.cli.keys import _admin

DATA_COMMANDS = ("sql", "invoice", "report", "export")
"""The commands that read usage, and so take every usage source's option."""


class UsageSource(Protocol):
    """Where the data commands read usage from. Methods may raise ``SystemExit`` with a
    message for the user (a refused query, a file that cannot be opened)."""

    def sql(self, query: str) -> tuple[list[str], list[list[Any]]]:
        """Read-only SQL over the usage database: column names and rows."""
        ...

    def invoice(self, user: str, month: str) -> dict[str, Any]:
        """A user's invoice for a calendar month (``YYYY-MM``, UTC)."""
        ...

    def export_parquet(self, folder: str) -> tuple[str, int]:
        """Write usage as Parquet partitioned by day; the folder written and the row count."""
        ...


SourceOpener = Callable[[str], UsageSource]
"""Builds a usage source from the value given to its option (``--db FILE``: the file)."""


class AdminApi:
    """The running gateway's admin API (admin key from ``TOLLWAY_ADMIN_KEY``)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def sql(self, query: str) -> tuple[list[str], list[list[Any]]]:
        out = _admin(self.url, "POST", "/admin/sql", {"query": query})
        return out["columns"], out["rows"]

    def invoice(self, user: str, month: str) -> dict[str, Any]:
        return _admin(self.url, "GET", f"/admin/invoices/{user}?month={month}")  # type: ignore[no-any-return]

    def export_parquet(self, folder: str) -> tuple[str, int]:
        """The gateway writes only under its metering export_dir: ``folder`` is a name there."""
        out = _admin(self.url, "POST", "/admin/export", {"dir": folder})
        return out["path"], out["rows"]


def add_usage_source(
    subparsers: argparse._SubParsersAction,  # type: ignore[type-arg]
    flag: str,
    *,
    help: str,
    open: SourceOpener,
) -> None:
    """Give every data command the option ``flag``; a command given it reads usage from
    ``open(value)`` instead of the admin API. For a plugin's ``register_commands``."""
    dest = flag.lstrip("-").replace("-", "_")
    for name in DATA_COMMANDS:
        parser = subparsers.choices[name]
        parser.add_argument(flag, dest=dest, default=None, help=help)
        sources = parser.get_default("usage_sources") or ()
        parser.set_defaults(usage_sources=(*sources, (dest, open)))


def usage_source(args: argparse.Namespace) -> UsageSource:
    """The source a data command's options chose: a plugin's option that was given, else the
    admin API at ``--url``."""
    for dest, open_source in args.usage_sources:
        value = vars(args)[dest]
        if value is not None:
            return open_source(value)  # type: ignore[no-any-return]
    return AdminApi(args.url)


def _print_table(columns: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in columns]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for n, row in enumerate(cells):
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def cmd_sql(args: argparse.Namespace) -> int:
    columns, rows = usage_source(args).sql(args.query)
    if args.json:
        print(orjson.dumps({"columns": columns, "rows": rows}, default=str).decode())
    else:
        _print_table(columns, rows)
    return 0


def cmd_invoice(args: argparse.Namespace) -> int:
    from proxy.analytics import invoice_csv

    invoice = usage_source(args).invoice(args.user, args.month)
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
    source = usage_source(args)
    columns, rows = source.sql("SELECT * FROM kpis")
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
    columns, rows = source.sql("SELECT * FROM business ORDER BY month")
    print("\nBusiness (per month)")
    _print_table(columns, [[_fmt(v) for v in r] for r in rows])
    columns, rows = source.sql("SELECT * FROM sla")
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
    folder, rows = usage_source(args).export_parquet(args.parquet)
    print(f"exported {rows} rows to {folder} (Parquet, partitioned by day)")
    return 0
