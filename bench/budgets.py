"""CPU the budgets plugin adds to a request: its ``access`` and ``log`` hooks, in process.

The plugin's promise is "a few microseconds per request" with the in-process ledger. This
times the two hooks on one request context, called as the chain calls them (awaited, one after
the other), in three cases: a caller without any budget (the common case: one dict lookup), a
user with a price budget, and a user with a cost budget and a key budget besides (two accounts,
a token estimate from the body). Alternating rounds; the median round is reported.

    .venv/bin/python bench/budgets.py [--requests 200000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from plugins.budgets.ledger import MemoryLedger  # noqa: E402
from plugins.budgets.overrides import UserBudgets  # noqa: E402
from plugins.budgets.plugin import BudgetsConfig, BudgetsPlugin  # noqa: E402
from proxy.context import Principal, RequestContext, Usage  # noqa: E402
from proxy.events import EventBus  # noqa: E402
from proxy.policy import load_text  # noqa: E402

POLICY = """
version: 1
state: {dir: null}
providers: {openai: {kind: openai, base_url: "http://127.0.0.1:1/v1"}}
models: {gpt-5.4-mini: {provider: openai, input_per_mtok: 0.25, output_per_mtok: 2.0}}
features: {basic_suggestions: {price_per_request: 0.01}}
tiers:
  free: {features: [basic_suggestions]}
  pro: {includes: free, budget: {usd: 1000000}}
  team: {includes: free, budget: {usd: 1000000, basis: cost}}
"""


def make_plugin() -> BudgetsPlugin:
    policy = load_text(POLICY).policy
    plugin = BudgetsPlugin(BudgetsConfig(), policy)
    plugin.ledger = MemoryLedger(None)
    plugin.users = UserBudgets(None)
    plugin.events = EventBus()
    return plugin


def context(tier: str, attrs: dict[str, Any] | None = None) -> RequestContext:
    policy = load_text(POLICY).policy
    ctx = RequestContext(
        request_id="r",
        endpoint="chat",
        dialect="openai",
        request=None,  # type: ignore[arg-type]  # not read by the plugin
        client_ip="127.0.0.1",
        body={"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "hi " * 50}]},
        model="gpt-5.4-mini",
        principal=Principal("u1", "k1", tier, attrs or {}),
        feature="basic_suggestions",
        route=policy.routes()["gpt-5.4-mini"],
    )
    return ctx


async def per_request(plugin: BudgetsPlugin, ctx: RequestContext, n: int) -> float:
    """Microseconds of access + log per request."""
    access, log = plugin.access, plugin.log
    start = time.perf_counter()
    for _ in range(n):
        ctx.status = 0
        await access(ctx)
        ctx.status = 200
        ctx.usage = Usage(120, 40, True, True)
        await log(ctx)
    return (time.perf_counter() - start) / n * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    cases = {
        "no budget (free)": context("free"),
        "price budget (pro)": context("pro"),
        "cost budget + key budget (team)": context("team", {"budget_usd": 1_000_000.0}),
    }
    plugin = make_plugin()
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, ctx in cases.items():
            results[name].append(await per_request(plugin, ctx, args.requests))
    print(f"budgets plugin, access + log per request ({args.requests} x {args.rounds} rounds)")
    for name, values in results.items():
        print(f"  {name:34s} {statistics.median(values):6.2f} µs (median round)")


if __name__ == "__main__":
    asyncio.run(main())
