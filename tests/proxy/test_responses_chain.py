"""Every plugin on ``/v1/responses``: limits, features, ``model: auto``, cache, coalescing and
metering, for the three kinds of route (native, chat-only, Claude) of ``test_responses``."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.responses import Response

from tests.conftest import ADMIN_KEY, Emulator, Gw, policy
from tests.proxy.test_responses import BASE, ROUTES, raw_events

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PLANS = policy(
    BASE,
    features={"code_suggestions": {"price_per_request": 0.02}},
    tiers={
        "free": {"requests_per_minute": 3, "requests_per_month": 1000},
        "pro": {"features": ["code_suggestions"], "requests_per_minute": 1000},
    },
)
PRICES = {  # USD per million tokens (input, output), as BASE lists them
    "gpt-5.4-mini": (Decimal("0.25"), Decimal("2.0")),
    "gpt-compat": (Decimal("0.5"), Decimal("1.5")),
    "claude-sonnet": (Decimal(3), Decimal(15)),
}
COMPLEX = (
    "Refactor this function and explain why it is slow:\n"
    "```python\ndef total(xs):\n    s = 0\n    for x in xs:\n        s = s + x\n    return s\n```"
)


async def sql(gw: Gw, query: str) -> list[dict[str, Any]]:
    async with gw.http.post(f"{gw.url}/admin/sql", json={"query": query}, headers=ADMIN) as r:
        res = await r.json()
        assert r.status == 200, res
    return [dict(zip(res["columns"], row, strict=True)) for row in res["rows"]]


async def test_metering_rows_costs_and_invoice(make_gateway: Any, tmp_path: Path) -> None:
    db = tmp_path / "usage.duckdb"
    chain = (
        "chain:\n  - name: auth\n  - name: limits\n    config: {}\n"
        f"  - name: metering\n    config: {{database: {db}, flush_interval: 50ms}}\n"
    )
    gw = await make_gateway(chain, base=PLANS)
    client = gw.openai(await gw.create_key("rita", "pro"))
    for model in ROUTES:
        await client.responses.create(model=model, input="hello gateway", instructions="be brief")
        async with client.responses.stream(
            model=model,
            input="hello stream",
            extra_headers={"X-Tollway-Feature": "code_suggestions"},
        ) as stream:
            await stream.get_final_response()
    rows = await sql(
        gw,
        "SELECT endpoint, model, stream, status, input_tokens, output_tokens, cost_usd, "
        "price_usd, feature FROM usage ORDER BY ts",
    )
    assert len(rows) == 6
    for row, model, streamed in zip(
        rows, [m for m in ROUTES for _ in (0, 1)], [False, True] * 3, strict=True
    ):
        assert (row["endpoint"], row["model"], row["stream"], row["status"]) == (
            "responses",
            model,
            streamed,
            200,
        )
        tokens = (2, 3) if streamed else (4, 3)
        assert (row["input_tokens"], row["output_tokens"]) == tokens, row
        per_in, per_out = PRICES[model]
        cost = (tokens[0] * per_in + tokens[1] * per_out) / Decimal(1_000_000)
        assert Decimal(row["cost_usd"]) == cost, row
        assert Decimal(row["price_usd"]) == Decimal("0.02" if streamed else "0.01")
    month = time.strftime("%Y-%m", time.gmtime())
    async with gw.http.get(
        f"{gw.url}/admin/invoices/rita", params={"month": month}, headers=ADMIN
    ) as r:
        invoice = await r.json()
        assert r.status == 200, invoice
    lines = {line["description"]: line for line in invoice["lines"]}
    assert lines["AI API: responses / basic_suggestions"]["quantity"] == 3
    assert lines["AI API: responses / code_suggestions"]["quantity"] == 3


async def test_limits_and_features(make_gateway: Any) -> None:
    gw = await make_gateway(
        "chain:\n  - name: auth\n  - name: limits\n    config: {}\n", base=PLANS
    )
    free = gw.openai(await gw.create_key("fay", "free"))
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await free.responses.create(
            model="gpt-compat", input="x", extra_headers={"X-Tollway-Feature": "code_suggestions"}
        )
    assert denied.value.code == "feature_not_in_plan"
    for model in ROUTES:
        raw = await free.responses.with_raw_response.create(model=model, input="hi")
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
    with pytest.raises(openai.RateLimitError) as limited:
        await free.responses.create(model="gpt-5.4-mini", input="one too many")
    assert limited.value.code == "plan_rate_limit_exceeded"
    assert int(limited.value.response.headers["retry-after"]) >= 1


async def test_monthly_quota(make_gateway: Any) -> None:
    base = policy(PLANS, tiers={"free": {"requests_per_month": 2, "requests_per_minute": 100}})
    gw = await make_gateway("chain:\n  - name: auth\n  - name: limits\n    config: {}\n", base=base)
    client = gw.openai(await gw.create_key("quin", "free"))
    await client.responses.create(model="gpt-compat", input="one")
    stream = await client.responses.create(model="claude-sonnet", input="two", stream=True)
    assert [e.type async for e in stream][-1] == "response.completed"
    with pytest.raises(openai.RateLimitError) as info:
        await client.responses.create(model="gpt-5.4-mini", input="three")
    assert info.value.code == "monthly_quota_exceeded"


async def test_model_auto_chooses_by_complexity(make_gateway: Any, emulator: Emulator) -> None:
    chain = (
        "chain:\n  - name: auth\n  - name: routing\n"
        "    config: {auto: {cheap: gpt-compat, strong: claude-sonnet}}\n"
    )
    gw = await make_gateway(chain, base=BASE)
    client = gw.openai(await gw.create_key())
    simple = await client.responses.with_raw_response.create(model="auto", input="say hello")
    assert simple.headers["x-tollway-model"] == "gpt-compat"
    assert simple.headers["x-tollway-route"].startswith("cheap")
    assert (await emulator.last())["path"] == "/v1/chat/completions"
    hard = await client.responses.with_raw_response.create(
        model="auto", instructions="be thorough", input=[{"role": "user", "content": COMPLEX}]
    )
    assert hard.headers["x-tollway-model"] == "claude-sonnet"
    assert hard.headers["x-tollway-route"].startswith("strong")
    assert (await emulator.last())["path"] == "/v1/messages"
    async with client.responses.stream(model="auto", input=COMPLEX) as stream:
        final = await stream.get_final_response()
    assert final.model == "auto" and final.output_text.startswith("Echo: Refactor")


@pytest.mark.parametrize("model", ROUTES)
async def test_cache_hit_whole_and_replayed_as_a_stream(
    make_gateway: Any, emulator: Emulator, model: str
) -> None:
    gw = await make_gateway(
        "chain:\n  - name: auth\n  - name: cache\n    config: {default_ttl: 1h}\n", base=BASE
    )
    key = await gw.create_key()
    client = gw.openai(key)
    await emulator.reset()
    path = ROUTES[model][0]
    first = await client.responses.with_raw_response.create(model=model, input="cache me")
    again = await client.responses.with_raw_response.create(model=model, input="cache me")
    assert (first.headers["x-tollway-cache"], again.headers["x-tollway-cache"]) == ("miss", "hit")
    # the same Response under an id of the hit's own (the stored one is the first request's)
    hit = Response.model_validate_json(again.content)
    assert hit.id != first.parse().id and hit.id.startswith("resp_")
    assert hit.model_copy(update={"id": first.parse().id}) == first.parse()
    events = await raw_events(gw, key, {"model": model, "input": "cache me"})
    assert events[-1][0] == "response.completed"
    closing = {**events[-1][1]["response"], "id": first.parse().id}
    assert closing == first.parse().model_dump(mode="json", exclude_unset=True)
    async with client.responses.stream(model=model, input="cache me") as stream:
        replayed = await stream.get_final_response()
    assert (
        replayed.id not in (first.parse().id, hit.id) and replayed.output_text == "Echo: cache me"
    )
    assert (await emulator.stats())["by_path"] == {path: 1}
    # a streamed miss fills the cache for a whole hit too
    async with client.responses.stream(model=model, input="stream first") as stream:
        streamed = await stream.get_final_response()
    whole = await client.responses.with_raw_response.create(model=model, input="stream first")
    assert whole.headers["x-tollway-cache"] == "hit"
    assert whole.parse().id != streamed.id and whole.parse().usage == streamed.usage
    assert (await emulator.stats())["by_path"] == {path: 2}


@pytest.mark.parametrize("model", ROUTES)
async def test_identical_requests_share_one_call(
    make_gateway: Any, emulator: Emulator, model: str
) -> None:
    gw = await make_gateway("chain:\n  - name: auth\n  - name: batching\n", base=BASE)
    client = gw.openai(await gw.create_key())
    await emulator.reset()
    slow = {"x-emulator-latency-ms": "300"}
    whole = await asyncio.gather(
        *(client.responses.create(model=model, input="twins", extra_headers=slow) for _ in range(3))
    )
    assert {r.output_text for r in whole} == {"Echo: twins"}
    assert len({r.id for r in whole}) == 3  # one reply, an id per request

    async def streamed() -> str:
        async with client.responses.stream(
            model=model, input="stream twins", extra_headers=slow
        ) as stream:
            return (await stream.get_final_response()).output_text

    texts = await asyncio.gather(*(streamed() for _ in range(3)))
    assert set(texts) == {"Echo: stream twins"}
    assert (await emulator.stats())["by_path"] == {ROUTES[model][0]: 2}


async def test_fallback_from_a_native_to_a_translated_route(
    make_gateway: Any, emulator: Emulator
) -> None:
    base = policy(
        BASE, models={"broken": {"provider": "openai", "upstream_model": "emu-status-503"}}
    )
    chain = (
        "chain:\n  - name: auth\n  - name: routing\n"
        "    config: {fallbacks: {broken: [claude-sonnet]}}\n"
    )
    gw = await make_gateway(chain, base=base)
    client = gw.openai(await gw.create_key())
    raw = await client.responses.with_raw_response.create(model="broken", input="still here")
    assert raw.headers["x-tollway-model"] == "claude-sonnet"
    reply = raw.parse()
    assert reply.output_text == "Echo: still here" and len(reply.id) == 53  # translated
    async with client.responses.stream(model="broken", input="still streaming") as stream:
        final = await stream.get_final_response()
    assert final.output_text == "Echo: still streaming"
    assert (await emulator.last())["path"] == "/v1/messages"
