"""The metering plugin's ``tollway`` commands, added through ``register_commands``.

- ``tollway meter``: the process that loads the usage stream of many gateways into DuckDB and
  answers the usage part of the admin API (``plugins.metering.meter``).
- ``--db FILE`` on the data commands (``sql``, ``invoice``, ``report``, ``export``): read a
  stopped gateway's usage database directly instead of asking a running gateway (``--url``);
  rows its spool still holds are loaded first.

This module is imported when the ``tollway`` parser is built, so it imports neither DuckDB nor
the meter: each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.cli.data import add_usage_source

if TYPE_CHECKING:
    from plugins.metering.database import UsageDB


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``tollway meter`` and the data commands' ``--db``."""
    m = subparsers.add_parser("meter", help="load the usage stream of many gateways into DuckDB")
    m.add_argument("--policy", default="policies.yaml")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=8090)
    m.add_argument(
        "--name", default=None, help="consumer name (default: the host name; unique per meter)"
    )
    m.set_defaults(fn=cmd_meter)
    add_usage_source(
        subparsers, "--db", help="a stopped gateway's usage database file", open=OfflineUsage
    )


def cmd_meter(args: argparse.Namespace) -> int:
    from plugins.metering.meter import run_meter
    from proxy.cli.runner import load_policy, run

    loaded = load_policy(args.policy)
    try:
        run(run_meter(loaded, args.host, args.port, args.name))
    except ValueError as e:
        print(f"tollway meter: {e}", file=sys.stderr)
        return 1
    return 0


class OfflineUsage:
    """A stopped gateway's usage database, opened directly (``--db``): a usage source of the
    data commands (``proxy.cli.data.UsageSource``).

    Each call opens the file, loads the rows its spool still holds, answers and closes it, so
    nothing stays locked between two queries of ``tollway report``. Sandboxed as the gateway
    opens it: SQL reads the usage tables and nothing else on the host.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def sql(self, query: str) -> tuple[list[str], list[list[Any]]]:
        from proxy.analytics import ReadOnlyQuery

        db = self._open()
        try:
            return db.query(query)
        except ReadOnlyQuery as e:
            raise SystemExit(f"refused: {e}") from None
        except Exception as e:
            raise SystemExit(f"SQL error: {e}") from None
        finally:
            db.close()

    def invoice(self, user: str, month: str) -> dict[str, Any]:
        db = self._open()
        try:
            return db.invoice(user, month)
        finally:
            db.close()

    def export_parquet(self, folder: str) -> tuple[str, int]:
        """This machine's files, as the user running the command: any local folder."""
        target = str(Path(folder).resolve())
        db = self._open(target)
        try:
            return target, db.export_parquet(target)
        finally:
            db.close()

    def _open(self, export_dir: str | None = None) -> UsageDB:
        """Open the database, loading rows its spool still holds; ``export_dir``: the one
        folder an export may write to."""
        from plugins.metering.database import UsageDB
        from plugins.metering.spool import Spool

        try:
            db = UsageDB(self.path, export_dirs=[export_dir] if export_dir else [])
        except Exception as e:  # duckdb raises IOException when the gateway holds the lock
            raise SystemExit(
                f"cannot open {self.path}: {e}\n(is the gateway running? use --url)"
            ) from None
        spool_dir = Path(self.path).with_suffix(".spool")
        if spool_dir.is_dir():
            spool = Spool(spool_dir)
            spool.rotate()
            for segment in spool.closed():
                db.ingest(segment)  # and deletes it
            for owner in spool.orphan_owners():  # stopped or killed gateways' rows
                with spool.adopt(owner) as segments:
                    for segment in segments:
                        db.ingest(segment)
            spool.close()
        return db
