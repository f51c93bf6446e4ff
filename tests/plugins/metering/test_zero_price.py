"""Usage rows of the Responses API and of token counting, and how both reach an invoice.

A Responses call is billed like a chat call (its usage, the model's prices, the feature's
price); a count is metered as a zero-price call: one row with the count as input tokens and
cost and price 0, a zero line on the invoice, and nothing taken from the quota or the
tokens-per-minute budget.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import pytest

from tests.conftest import Gw, policy
from tests.plugins.metering.test_metering import ADMIN, BASE, chain, sql

FEATURE = {"X-Tollway-Feature": "basic_suggestions"}
LONG = [{"role": "user", "content": "count every one of these words please " * 40}]


async def rows(gw: Gw, query: str) -> list[dict[str, Any]]:
    status, res = await sql(gw, query)
    assert status == 200, res
    return [dict(zip(res["columns"], r, strict=True)) for r in res["rows"]]


async def test_responses_and_counts_are_rows_and_invoice_lines(
    make_gateway: Any, tmp_path: Path
) -> None:
    base = policy(
        BASE,
        # a budget one count of LONG would exhaust, were counts charged to it
        tiers={"pro": {"tokens_per_minute": 100}},
        models={"house-model": {"provider": "openai"}},  # no price
    )
    gw = await make_gateway(chain(tmp_path / "usage.duckdb"), base=base)
    key = await gw.create_key("ivy", "pro")
    messages, responses = gw.anthropic(key).messages, gw.openai(key).responses
    counts = {}
    for model in ("claude-sonnet", "gpt-5.4-mini", "house-model"):
        counted = await messages.count_tokens(
            model=model,
            messages=LONG,  # type: ignore[arg-type]
            extra_headers=FEATURE,
        )
        counts[model] = counted.input_tokens
    assert min(counts.values()) > 100  # each over the budget, were it charged
    replies = {}
    for model in ("claude-sonnet", "gpt-5.4-mini"):  # translated, and passed through
        replies[model] = await responses.create(
            model=model, input="say something short", extra_headers=FEATURE
        )

    got = await rows(
        gw,
        "SELECT endpoint, model, status, input_tokens, output_tokens, usage_estimated, "
        "cost_usd, price_usd FROM usage ORDER BY ts",
    )
    assert [(r["endpoint"], r["model"], r["status"]) for r in got] == [
        ("count_tokens", "claude-sonnet", 200),
        ("count_tokens", "gpt-5.4-mini", 200),
        ("count_tokens", "house-model", 200),
        ("responses", "claude-sonnet", 200),
        ("responses", "gpt-5.4-mini", 200),
    ]
    for row in got[:3]:
        assert row["input_tokens"] == counts[row["model"]]
        assert row["output_tokens"] == 0
        assert Decimal(row["cost_usd"]) == 0  # free at the provider, even without a price
        assert Decimal(row["price_usd"]) == 0  # and not sold
        # the provider counted for Claude; the gateway estimated for the others
        assert row["usage_estimated"] is (row["model"] != "claude-sonnet")
    prices = {"claude-sonnet": (3, 15), "gpt-5.4-mini": (Decimal("0.25"), Decimal("2.00"))}
    for row in got[3:]:
        usage = replies[row["model"]].usage
        assert usage is not None and usage.output_tokens > 0
        assert (row["input_tokens"], row["output_tokens"]) == (
            usage.input_tokens,
            usage.output_tokens,
        )
        per_in, per_out = prices[row["model"]]
        cost = (usage.input_tokens * per_in + usage.output_tokens * per_out) / Decimal(10**6)
        assert Decimal(row["cost_usd"]) == cost
        assert Decimal(row["price_usd"]) == Decimal("0.01")
        assert row["usage_estimated"] is False
    kpis = await rows(gw, "SELECT unpriced_requests FROM kpis")
    assert kpis == [{"unpriced_requests": 0}]  # the unpriced model's count cost nothing

    month = datetime.now(UTC).strftime("%Y-%m")
    async with gw.http.get(
        f"{gw.url}/admin/invoices/ivy", params={"month": month}, headers=ADMIN
    ) as r:
        assert r.status == 200
        invoice = await r.json()
    lines = [
        (x["description"], x["quantity"], x["unit_price"], x["total"]) for x in invoice["lines"]
    ]
    assert lines == [
        (f"pro plan, {month}", 1, "29", "29.00"),
        ("AI API: count_tokens / basic_suggestions", 3, "0", "0.00"),  # a zero line
        ("AI API: responses / basic_suggestions", 2, "0.01", "0.02"),
    ]
    assert invoice["total"] == "29.02"


async def test_counts_take_no_place_in_the_monthly_quota(make_gateway: Any, tmp_path: Path) -> None:
    """Rows or not, the quota counts only billable requests: counts in a month whose quota
    is 1 leave the one request there, and a second is refused."""
    base = policy(BASE, tiers={"free": {"requests_per_month": 1}})
    gw = await make_gateway(chain(tmp_path / "usage.duckdb"), base=base)
    key = await gw.create_key("quin", "free")
    client = gw.anthropic(key)
    for _ in range(3):
        await client.messages.count_tokens(model="claude-sonnet", messages=LONG)  # type: ignore[arg-type]
    await client.messages.create(model="claude-sonnet", max_tokens=5, messages=LONG)  # type: ignore[arg-type]
    with pytest.raises(anthropic.RateLimitError) as info:
        await client.messages.create(model="claude-sonnet", max_tokens=5, messages=LONG)  # type: ignore[arg-type]
    assert "quota" in info.value.message.lower()
    got = await rows(gw, "SELECT endpoint, count(*) AS n FROM usage GROUP BY 1 ORDER BY 1")
    assert got == [{"endpoint": "count_tokens", "n": 3}, {"endpoint": "messages", "n": 2}]
