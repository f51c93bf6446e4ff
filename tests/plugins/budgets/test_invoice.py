"""Overage past the monthly quota and a mid-month plan change on the invoice, each total
computed independently in the test, to the cent."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from plugins.metering.billing import PlanTerms
from plugins.metering.database import UsageDB
from tests.conftest import ADMIN_KEY, GatewayFactory, policy
from tests.plugins.budgets.conftest import at, metering

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
CENT = Decimal("0.01")
MSG = [{"role": "user", "content": "hello there, how are you"}]


def cents(x: Decimal) -> Decimal:
    return x.quantize(CENT, ROUND_HALF_UP)


async def test_an_overage_plan_goes_on_past_its_quota_and_bills_it(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    base = policy(
        tiers={
            "free": {"requests_per_month": 2, "monthly_cost": 0},  # no overage: refused
            "pro": {
                "requests_per_month": 3,
                "monthly_cost": 29,
                "overage": {"price_per_request": 0.25, "price_per_mtok": 1000},
            },
        }
    )
    chain = [{"name": "auth"}, {"name": "limits"}, metering(tmp_path / "u.duckdb")]
    gw = await make_gateway(chain, base=base)
    pro = gw.openai(await gw.create_key("olga", "pro"))
    for _ in range(5):  # 3 in the quota, 2 past it: served
        await pro.chat.completions.create(model="gpt-5.4-mini", messages=MSG)
    free = gw.openai(await gw.create_key("fred", "free"))
    for _ in range(2):
        await free.chat.completions.create(model="gpt-5.4-mini", messages=MSG)
    with pytest.raises(openai.RateLimitError):
        await free.chat.completions.create(model="gpt-5.4-mini", messages=MSG)

    async with gw.http.post(
        f"{gw.url}/admin/sql",
        json={
            "query": "SELECT ts, input_tokens + output_tokens, price_usd FROM usage "
            "WHERE user_id = 'olga' ORDER BY ts"
        },
        headers=AUTH,
    ) as r:
        rows = (await r.json())["rows"]
    month = str(rows[0][0])[:7]
    async with gw.http.get(
        f"{gw.url}/admin/invoices/olga", params={"month": month}, headers=AUTH
    ) as r:
        invoice: dict[str, Any] = await r.json()
    past = rows[3:]
    tokens = sum(int(t) for _, t, _ in past)
    usage = sum((Decimal(str(p)) for _, _, p in rows), Decimal(0))
    expected = {
        "subscription": Decimal(29),
        "quota": Decimal(0),
        "overage": cents(Decimal("0.25") * 2),
        "overage_tokens": cents(Decimal(1000) / 1_000_000 * tokens),
        "ai_api": cents(usage),
    }
    by_service = {line["service"]: line for line in invoice["lines"]}
    assert {s: Decimal(line["total"]) for s, line in by_service.items()} == expected
    assert by_service["quota"]["quantity"] == 3
    assert by_service["overage"]["quantity"] == 2
    assert by_service["overage_tokens"]["quantity"] == tokens
    assert Decimal(invoice["total"]) == sum(expected.values())


def _rows(path: Path, rows: list[tuple[float, str, str]]) -> Path:
    """A spool segment of successful $0.01 requests: (ts, user, tier)."""
    path.write_bytes(
        b"".join(
            orjson.dumps(
                {
                    "ts": ts,
                    "request_id": f"r{i}",
                    "user_id": user,
                    "tier": tier,
                    "feature": "basic_suggestions",
                    "endpoint": "chat",
                    "status": 200,
                    "input_tokens": 10,
                    "output_tokens": 20,
                    "input_per_mtok": 0.25,
                    "output_per_mtok": 2.0,
                    "price": 0.01,
                }
            )
            + b"\n"
            for i, (ts, user, tier) in enumerate(rows)
        )
    )
    return path


def test_a_mid_month_upgrade_is_prorated_by_days(tmp_path: Path) -> None:
    # the rule (plugins.metering.billing): each UTC day is billed to the plan of the user's
    # last request by its end; the days before the month's first request to the plan of the
    # last request before the month, else of the month's first request
    db = UsageDB(tmp_path / "u.duckdb", spool_dir=tmp_path)
    db.ingest(
        _rows(
            tmp_path / "seg.jsonl",
            [
                (at(2026, 11, 3), "pia", "free"),
                (at(2026, 11, 21, 8), "pia", "pro"),  # the upgrade: day 21 is pro's
                (at(2026, 11, 25), "pia", "pro"),
                (at(2026, 10, 30), "quinn", "free"),  # October: free
                (at(2026, 11, 11), "quinn", "pro"),  # Nov 1-10 free, 11-30 pro
                (at(2026, 11, 5), "rui", "pro"),  # one plan: the whole price
            ],
        )
    )
    costs = {"free": 9.0, "pro": 29.0}
    terms = {"pro": PlanTerms(1000, 0.0, 0.0)}

    def subscription(user: str) -> list[tuple[str, Decimal]]:
        inv = db.invoice(user, "2026-11", costs, None, terms)
        total = sum((Decimal(x["total"]) for x in inv["lines"]), Decimal(0))
        assert Decimal(inv["total"]) == total
        return [
            (x["description"], Decimal(x["total"]))
            for x in inv["lines"]
            if x["service"] == "subscription"
        ]

    free_20, pro_10 = cents(Decimal(9) * 20 / 30), cents(Decimal(29) * 10 / 30)
    assert (free_20, pro_10) == (Decimal("6.00"), Decimal("9.67"))
    assert subscription("pia") == [
        ("free plan, 2026-11: 20 of 30 days", free_20),
        ("pro plan, 2026-11: 10 of 30 days", pro_10),
    ]
    assert subscription("quinn") == [
        ("free plan, 2026-11: 10 of 30 days", cents(Decimal(9) * 10 / 30)),
        ("pro plan, 2026-11: 20 of 30 days", cents(Decimal(29) * 20 / 30)),
    ]
    assert subscription("rui") == [("pro plan, 2026-11", Decimal(29))]
    inv = db.invoice("pia", "2026-11", costs, None, terms)
    assert Decimal(inv["total"]) == free_20 + pro_10 + Decimal("0.03")
    db.close()
