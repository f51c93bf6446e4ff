"""``tollway budgets set|show|clear``: a user's budget, through the running gateway's admin
API (``--url``, the admin key from ``TOLLWAY_ADMIN_KEY``), like ``tollway keys``."""

from __future__ import annotations

import argparse
import os
import urllib.parse
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    b = subparsers.add_parser("budgets", help="set, show or clear a user's monthly budget")
    b.add_argument(
        "--url",
        default=os.environ.get("TOLLWAY_URL", "http://127.0.0.1:8080"),
        help="the running gateway (admin key from TOLLWAY_ADMIN_KEY)",
    )
    sub = b.add_subparsers(dest="budgets_cmd", required=True)
    s = sub.add_parser("set", help="give the user a budget of their own (replaces the tier's)")
    s.add_argument("user")
    s.add_argument("--usd", type=float, required=True, help="USD per calendar month (UTC)")
    s.add_argument("--basis", choices=["price", "cost"], default="price")
    s.add_argument("--alerts", default="50,80,100", help="percents, comma-separated")
    s.add_argument("--soft", action="store_true", help="alerts only, never refuse")
    sh = sub.add_parser("show", help="the budget in force and the month's spending")
    sh.add_argument("user")
    sh.add_argument("--month", default=None, help="YYYY-MM (default: this month)")
    c = sub.add_parser("clear", help="give the user the tier's budget back")
    c.add_argument("user")
    b.set_defaults(fn=cmd_budgets)


def cmd_budgets(args: argparse.Namespace) -> int:
    import orjson

    from proxy.cli.keys import _admin

    path = "/admin/budgets/" + urllib.parse.quote(args.user, safe="")
    out: Any
    if args.budgets_cmd == "set":
        try:
            alerts = [int(a) for a in args.alerts.split(",") if a.strip()]
        except ValueError:
            raise SystemExit("--alerts: percents such as 50,80,100") from None
        body = {"usd": args.usd, "basis": args.basis, "alerts": alerts, "hard": not args.soft}
        out = _admin(args.url, "PUT", path, body)
    elif args.budgets_cmd == "show":
        query = "?month=" + urllib.parse.quote(args.month) if args.month else ""
        out = _admin(args.url, "GET", path + query)
    else:
        out = _admin(args.url, "DELETE", path)
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    return 0
