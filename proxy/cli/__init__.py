"""The ``tollway`` command.

This module builds the parser and runs the chosen command; the commands live in one module per
kind: ``serve`` (``serve``, ``check``, ``emulator``, ``demo``: running the gateway), ``keys``
(API keys) and ``data`` (``sql``, ``invoice``, ``report``, ``export``: the usage database).
Plugins add theirs through the ``register_commands`` hook (``plugins``: the metering plugin's
``tollway meter`` and ``--db``). ``python -m proxy.cli`` runs ``main`` (``__main__``). What
only some commands need (DuckDB, the plugins, the gateway app) is imported inside them, so
importing this package stays cheap.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from proxy.cli.data import cmd_export, cmd_invoice, cmd_report, cmd_sql
from proxy.cli.keys import add_key_commands, cmd_forget, cmd_keys
from proxy.cli.serve import cmd_check, cmd_demo, cmd_emulator, cmd_serve

log = logging.getLogger("tollway")

PLUGIN_FREE = frozenset({"serve", "check", "emulator", "demo", "keys", "forget"})
"""The core's commands no plugin extends (plugins add commands of their own and options of the
data commands), parsed without importing any plugin: a gateway imports only the plugins its
chain names, and ``tollway keys`` starts as fast as before plugins had commands."""


def build_parser(*, plugins: bool = True) -> argparse.ArgumentParser:
    """The core's commands, then (with ``plugins``) those of every built-in plugin and entry
    point of group ``tollway`` (their ``register_commands`` hook)."""
    p = argparse.ArgumentParser(prog="tollway", description="Tollway AI API gateway")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--policy", default="policies.yaml", help="policy file (default policies.yaml)")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the port (default 1; more need state.url: redis://)",
    )
    # a worker started by a --workers parent: the parent's pid, and the worker's number
    s.add_argument("--worker-of", type=int, default=None, help=argparse.SUPPRESS)
    s.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    s.set_defaults(fn=cmd_serve)

    c = sub.add_parser("check", help="validate a policy file (exit 1 with errors)")
    c.add_argument("file")
    c.add_argument(
        "--strict",
        action="store_true",
        help="a secret that is not set here is an error (default: a warning)",
    )
    c.set_defaults(fn=cmd_check)

    e = sub.add_parser("emulator", help="run the OpenAI/Anthropic-compatible upstream emulator")
    e.add_argument("--host", default="127.0.0.1")
    e.add_argument("--port", type=int, default=9100)
    e.add_argument("--api-key", default=None, help="require this key from callers")
    e.set_defaults(fn=cmd_emulator)

    k = sub.add_parser("keys", help="create, list, show, update, rotate and revoke API keys")
    k.add_argument(
        "--url",
        default=os.environ.get("TOLLWAY_URL", "http://127.0.0.1:8080"),
        help="the running gateway (admin key from TOLLWAY_ADMIN_KEY)",
    )
    k.add_argument("--state-dir", default=None, help="edit a stopped gateway's key file instead")
    add_key_commands(k.add_subparsers(dest="keys_cmd", required=True))
    k.set_defaults(fn=cmd_keys)

    def data_cmd(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument(
            "--url",
            default=os.environ.get("TOLLWAY_URL", "http://127.0.0.1:8080"),
            help="the running gateway (admin key from TOLLWAY_ADMIN_KEY)",
        )
        c.set_defaults(usage_sources=())  # a plugin adds its own (metering's --db)
        return c

    q = data_cmd("sql", "read-only SQL over the usage database")
    q.add_argument("query")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.set_defaults(fn=cmd_sql)
    inv = data_cmd("invoice", "a user's monthly invoice")
    inv.add_argument("--user", required=True)
    inv.add_argument("--month", required=True, help="YYYY-MM (UTC)")
    inv.add_argument("--format", choices=("json", "csv"), default="json")
    inv.set_defaults(fn=cmd_invoice)
    rep = data_cmd("report", "KPIs against the targets, and the business figures")
    rep.set_defaults(fn=cmd_report)
    ex = data_cmd("export", "write usage as Parquet partitioned by day")
    ex.add_argument(
        "--parquet",
        required=True,
        metavar="DIR",
        help="with --url: a folder name under the gateway's metering export_dir; "
        "with --db: any local folder",
    )
    ex.set_defaults(fn=cmd_export)

    f = sub.add_parser(
        "forget",
        help="delete a user's keys, usage rows, cache entries, quota counts and stored responses",
    )
    f.add_argument("--user", required=True)
    f.add_argument(
        "--url",
        default=os.environ.get("TOLLWAY_URL", "http://127.0.0.1:8080"),
        help="the running gateway (admin key from TOLLWAY_ADMIN_KEY)",
    )
    f.set_defaults(fn=cmd_forget)

    d = sub.add_parser("demo", help="emulator + gateway with the demo policy and a demo key")
    d.add_argument("--policy", default="policies.demo.yaml")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8080)
    d.add_argument("--tier", default="pro")
    d.set_defaults(fn=cmd_demo)
    if plugins:
        from proxy.cli.plugins import add_plugin_commands

        add_plugin_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    words = sys.argv[1:] if argv is None else argv
    command = next((w for w in words if not w.startswith("-")), None)
    args = build_parser(plugins=command not in PLUGIN_FREE).parse_args(words)
    return int(args.fn(args) or 0)
