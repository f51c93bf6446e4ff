"""Budgets in money: a pro user's $5 budget with alerts, refusals in both dialects, the month's
reset, per-user budgets by the admin API and the CLI, and 200 requests racing for the end of
a budget."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import ADMIN_KEY, GatewayFactory, Gw, policy
from tests.plugins.budgets.conftest import CHAIN, Clock, at, events, metering, plugin, priced
from tests.procs import run_tollway

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
MSG = [{"role": "user", "content": "hello there"}]


async def report(client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.create(
        model="gpt-5.4-mini", messages=MSG, extra_headers={"X-Tollway-Feature": "report"}
    )


async def test_a_pro_users_five_dollar_budget_alerts_at_80_percent_then_refuses(
    make_gateway: GatewayFactory,
) -> None:
    base = priced(pro={"budget": {"usd": 5, "alerts": [80, 100]}})
    gw: Gw = await make_gateway(CHAIN[:2], base=base)
    clock = plugin(gw).clock = Clock(at(2026, 12, 15))
    got = events(gw)
    key = await gw.create_key("alice", "pro")
    client = gw.openai(key)
    for i in range(8):  # $0.50 each: the 8th takes the month to $4.00, 80 %
        await report(client)
        assert [e.data["percent"] for e in got] == ([80] if i == 7 else [])
    (alert,) = got
    assert (alert.kind, alert.subject, alert.dedupe) == (
        "budget.threshold",
        "alice",
        "budget:alice:2026-12:80",
    )
    assert alert.data == {
        "percent": 80,
        "spent_usd": 4.0,
        "budget_usd": 5.0,
        "month": "2026-12",
        "basis": "price",
        "scope": "user",
        "user": "alice",
    }
    await report(client)
    await report(client)  # $5.00: 100 %
    assert [e.data["percent"] for e in got] == [80, 100]
    with pytest.raises(openai.APIStatusError) as info:
        await report(client)
    assert info.value.status_code == 402
    err = info.value.body
    assert isinstance(err, dict)
    assert (err["type"], err["code"]) == ("insufficient_quota", "budget_exceeded")
    assert "2027-01-01T00:00:00+00:00" in err["message"]
    assert info.value.response.headers["x-tollway-budget-reset"] == "2027-01-01T00:00:00+00:00"
    assert "retry-after" not in info.value.response.headers
    assert got[-1].kind == "budget.exceeded" and got[-1].dedupe == "budget:alice:2026-12:exceeded"
    with pytest.raises(anthropic.APIStatusError) as ainfo:  # Anthropic's shape on /v1/messages
        await gw.anthropic(key).messages.create(
            model="claude-sonnet",
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-Tollway-Feature": "report"},
        )
    assert ainfo.value.status_code == 402
    assert ainfo.value.body["error"]["type"] == "billing_error"  # type: ignore[index]
    assert [e.kind for e in got].count("budget.exceeded") == 1  # once per month and instance
    clock.t = at(2027, 1, 1, 0)  # a new month: a new budget
    await report(client)
    async with gw.http.get(f"{gw.url}/admin/budgets/alice", headers=AUTH) as r:
        shown = await r.json()
    assert shown["month"] == "2027-01" and shown["spent_usd"] == 0.5
    assert shown["left_usd"] == 4.5 and shown["budget"]["source"] == "tier"


async def test_failed_requests_settle_to_nothing(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(CHAIN[:2], base=priced(pro={"budget": {"usd": 1}}))
    client = gw.openai(await gw.create_key("bob", "pro"))
    with pytest.raises(openai.APIStatusError):
        await client.chat.completions.create(
            model="gpt-5.4-mini",
            messages=MSG,
            extra_headers={"X-Tollway-Feature": "report", "x-emulator-status": "500"},
        )
    async with gw.http.get(f"{gw.url}/admin/budgets/bob", headers=AUTH) as r:
        shown = await r.json()
    assert (shown["spent_usd"], shown["reserved_usd"]) == (0, 0)


async def test_200_concurrent_requests_never_pass_a_price_budget(
    make_gateway: GatewayFactory,
) -> None:
    # price basis: the estimate is the price a success is billed, so the in-flight estimates
    # cover every admitted request exactly and the bound on the overshoot is 0
    gw = await make_gateway(CHAIN[:2], base=priced(pro={"budget": {"usd": 1.0}}))
    plugin(gw).clock = Clock(at(2026, 12, 15))
    client = gw.openai(await gw.create_key("carol", "pro"), max_retries=0)
    for _ in range(90):  # $0.90 of $1.00 spent
        await client.chat.completions.create(model="gpt-5.4-mini", messages=MSG)

    async def one() -> int:
        try:
            await client.chat.completions.create(
                model="gpt-5.4-mini", messages=MSG, extra_headers={"x-emulator-latency-ms": "200"}
            )
            return 200
        except openai.APIStatusError as e:
            return e.status_code

    statuses = await asyncio.gather(*(one() for _ in range(200)))
    price, budget, spent_before = 0.01, 1.0, 0.90
    admitted_bound = round((budget - spent_before) / price)  # 10
    overshoot_bound = 0.0  # in-flight estimates minus their actual prices: nothing
    assert statuses.count(200) == admitted_bound
    assert statuses.count(402) == 200 - admitted_bound
    async with gw.http.get(f"{gw.url}/admin/budgets/carol", headers=AUTH) as r:
        shown = await r.json()
    assert shown["reserved_usd"] == 0
    assert shown["spent_usd"] <= budget + overshoot_bound
    assert shown["spent_usd"] == pytest.approx(spent_before + admitted_bound * price)


async def test_admin_api_and_cli_set_show_and_clear_a_users_budget(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = await make_gateway(CHAIN[:2], base=priced(pro={"budget": {"usd": 100}}))
    client = gw.openai(await gw.create_key("dave", "pro"))
    await report(client)
    env = {"TOLLWAY_ADMIN_KEY": ADMIN_KEY}
    code, out = await run_tollway(
        "budgets", "--url", gw.url, "set", "dave", "--usd", "0.75", "--alerts", "50", env=env
    )
    assert code == 0, out
    assert '"source": "user"' in out and '"usd": 0.75' in out
    with pytest.raises(openai.APIStatusError) as info:  # $0.50 spent + $0.50 > $0.75
        await report(client)
    assert info.value.status_code == 402
    code, out = await run_tollway("budgets", "--url", gw.url, "show", "dave", env=env)
    assert code == 0 and '"spent_usd": 0.5' in out, out
    code, out = await run_tollway("budgets", "--url", gw.url, "clear", "dave", env=env)
    assert code == 0 and '"source": "tier"' in out, out
    await report(client)  # the tier's $100 again
    for body, param in (
        ({"usd": -1}, "usd"),
        ({"usd": 1, "basis": "gold"}, "basis"),
        ({"usd": 1, "alerts": [0]}, "alerts"),
        ({"usd": 1, "extra": 1}, "extra"),
        ({}, "usd"),
    ):
        async with gw.http.put(f"{gw.url}/admin/budgets/dave", json=body, headers=AUTH) as r:
            err: dict[str, Any] = await r.json()
            assert r.status == 400, err
            assert err["error"]["param"] == param, err
    async with gw.http.put(f"{gw.url}/admin/budgets/dave", data=b"{", headers=AUTH) as r:
        assert r.status == 400
    async with gw.http.put(f"{gw.url}/admin/budgets/dave", json={"usd": 1}) as r:
        assert r.status == 401
    async with gw.http.delete(f"{gw.url}/admin/budgets/nobody", headers=AUTH) as r:
        assert r.status == 404
    async with gw.http.get(f"{gw.url}/admin/budgets/dave?month=2026-13", headers=AUTH) as r:
        assert r.status == 400


async def test_a_users_budget_survives_a_restart(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    base = policy(priced(), state={"dir": str(tmp_path / "state")})
    gw = await make_gateway(CHAIN[:2], base=base)
    key = await gw.create_key("erin", "pro")
    async with gw.http.put(f"{gw.url}/admin/budgets/erin", json={"usd": 0.5}, headers=AUTH) as r:
        assert r.status == 200
    await report(gw.openai(key))
    ledger = plugin(gw).ledger
    assert ledger is not None
    await ledger.close()  # its file written, as at shutdown
    gw2 = await make_gateway(CHAIN[:2], base=base)
    with pytest.raises(openai.APIStatusError) as info:  # $0.50 spent of $0.50
        await report(gw2.openai(key))
    assert info.value.status_code == 402


async def test_a_price_budget_counts_what_the_usage_rows_bill(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    base = priced(pro={"budget": {"usd": 10}, "prices": {"report": 0.3}})  # the tier's price
    gw = await make_gateway([*CHAIN[:2], metering(tmp_path / "u.duckdb")], base=base)
    client = gw.openai(await gw.create_key("hana", "pro"))
    await report(client)
    await client.chat.completions.create(model="gpt-5.4-mini", messages=MSG)
    with pytest.raises(openai.APIStatusError):
        await client.chat.completions.create(
            model="gpt-5.4-mini", messages=MSG, extra_headers={"x-emulator-status": "400"}
        )
    async with gw.http.post(
        f"{gw.url}/admin/sql",
        json={"query": "SELECT sum(price_usd), count(*) FROM usage WHERE user_id = 'hana'"},
        headers=AUTH,
    ) as r:
        ((billed, rows),) = (await r.json())["rows"]
    async with gw.http.get(f"{gw.url}/admin/budgets/hana", headers=AUTH) as r:
        shown = await r.json()
    assert rows == 3 and float(billed) == pytest.approx(0.31)
    assert shown["spent_usd"] == pytest.approx(float(billed), abs=1e-9)
