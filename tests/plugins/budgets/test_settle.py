"""A stream settles to its real usage (cost basis), as the usage table records it; two
gateways on one Redis hold one budget between them."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from pathlib import Path

import openai
import orjson
import pytest

from tests.conftest import ADMIN_KEY, GatewayFactory, policy
from tests.plugins.budgets.conftest import CHAIN, metering, plugin, priced
from tests.procs import until

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def test_a_stream_settles_to_its_real_cost(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    base = priced(pro={"budget": {"usd": 1, "basis": "cost"}})
    gw = await make_gateway([*CHAIN[:2], metering(tmp_path / "u.duckdb")], base=base)
    client = gw.openai(await gw.create_key("fay", "pro"))
    held: list[int] = []
    stream = await client.chat.completions.create(
        model="claude-sonnet",  # $3 / $15 per million: the amounts are not lost in rounding
        messages=[{"role": "user", "content": "tell me a long story " * 20}],
        max_tokens=400,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-emulator-words": "300", "x-emulator-chunk-delay-ms": "2"},
    )
    usage = None
    async for chunk in stream:
        if not held:  # while the stream runs, its estimate is reserved
            ledger = plugin(gw).ledger
            assert ledger is not None
            held.append((await ledger.status("u:fay", plugin(gw).month.current(time.time())[0]))[1])
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens == 300
    # the reservation: prompt JSON bytes / 4 at $3 and max_tokens at $15 per million
    prompt = [{"role": "user", "content": "tell me a long story " * 20}]
    assert held[0] == round(len(orjson.dumps(prompt)) // 4 * 3 * 1000 + 400 * 15 * 1000)
    expected = Decimal(usage.prompt_tokens * 3 + usage.completion_tokens * 15) / 1_000_000
    async with gw.http.post(
        f"{gw.url}/admin/sql",
        json={"query": "SELECT sum(cost_usd) FROM usage WHERE user_id = 'fay'"},
        headers=AUTH,
    ) as r:
        ((sql_cost,),) = (await r.json())["rows"]
    assert Decimal(str(sql_cost)) == expected
    async with gw.http.get(f"{gw.url}/admin/budgets/fay", headers=AUTH) as r:
        shown = await r.json()
    assert Decimal(str(shown["spent_usd"])) == expected and shown["reserved_usd"] == 0


async def test_two_gateways_on_one_redis_hold_one_budget(
    make_gateway: GatewayFactory, redis_url: str, tmp_path: Path
) -> None:
    def base(name: str) -> dict[str, object]:
        return policy(
            priced(pro={"budget": {"usd": 0.1, "alerts": [50]}}),
            state={"url": redis_url, "dir": str(tmp_path / name), "check_interval": "200ms"},
        )

    a = await make_gateway(CHAIN[:2], base=base("a"))
    b = await make_gateway(CHAIN[:2], base=base("b"))
    got_a, got_b = [], []
    from proxy.appkeys import RESOURCES
    from proxy.events import EVENTS, EventBus

    a.app[RESOURCES].get(EVENTS, EventBus).subscribe(got_a.append)
    b.app[RESOURCES].get(EVENTS, EventBus).subscribe(got_b.append)
    key = await a.create_key("gus", "pro")
    clients = [a.openai(key), b.openai(key)]
    msg = [{"role": "user", "content": "hi"}]
    for i in range(10):  # $0.01 each, alternating: $0.10 between them
        await clients[i % 2].chat.completions.create(model="gpt-5.4-mini", messages=msg)
    for client in clients:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="gpt-5.4-mini", messages=msg)
        assert info.value.status_code == 402
    alerts = [e for e in got_a + got_b if e.kind == "budget.threshold"]
    assert [e.dedupe for e in alerts] == [f"budget:gus:{alerts[0].data['month']}:50"]
    # a user's own budget set on one instance holds on the other at its next refresh
    async with a.http.put(f"{a.url}/admin/budgets/gus", json={"usd": 0.2}, headers=AUTH) as r:
        assert r.status == 200

    async def b_sees_it() -> bool:
        users = plugin(b).users
        return users is not None and "gus" in users.live

    await until(b_sees_it, 5, what="the budget set on a reaching b")
    await asyncio.gather(
        *(clients[1].chat.completions.create(model="gpt-5.4-mini", messages=msg) for _ in range(10))
    )
    with pytest.raises(openai.APIStatusError):
        await clients[0].chat.completions.create(model="gpt-5.4-mini", messages=msg)
