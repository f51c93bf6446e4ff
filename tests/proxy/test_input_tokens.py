"""``POST /v1/responses/input_tokens`` (``client.responses.input_tokens.count``) through the
gateway, for the three kinds of route of ``test_responses``: an OpenAI provider serving the
Responses API counts itself, a Claude model is counted by Anthropic after translation, and a
chat-only provider's model gets the gateway's estimate. Then the errors, in OpenAI's shape,
``previous_response_id`` with the ``responses`` plugin, and the zero-price usage rows."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.responses import InputTokenCountResponse

from tests.conftest import ADMIN_KEY, Emulator, Gw, policy
from tests.proxy.test_endpoints import PROVIDER_ID, strict
from tests.proxy.test_responses import BASE, TOOLS

INPUT = "count these five words please"
INSTRUCTIONS = "be brief"


@pytest.fixture
async def rgw(make_gateway: Any) -> Gw:
    return await make_gateway(base=BASE)  # type: ignore[no-any-return]


async def counted(raw: Any) -> InputTokenCountResponse:
    """The reply, checked to be exactly the SDK's type (no field missing, none unknown)."""
    return strict(raw.http_response.json(), InputTokenCountResponse)  # type: ignore[no-any-return]


async def test_a_native_models_count_is_its_providers(rgw: Gw, emulator: Emulator) -> None:
    client = rgw.openai(await rgw.create_key())
    raw = await client.responses.input_tokens.with_raw_response.count(
        model="gpt-5.4-mini", input=INPUT, instructions=INSTRUCTIONS, tools=TOOLS
    )
    count = await counted(raw)
    last = await emulator.last()
    assert last["path"] == "/v1/responses/input_tokens"
    assert last["body"] == {
        "model": "gpt-5.4-mini",
        "input": INPUT,
        "instructions": INSTRUCTIONS,
        "tools": TOOLS,
    }
    assert "x-tollway-count" not in raw.headers
    assert raw.headers["x-tollway-model"] == "gpt-5.4-mini"
    assert PROVIDER_ID.match(raw.headers["x-upstream-request-id"])
    reply = await client.responses.create(
        model="gpt-5.4-mini", input=INPUT, instructions=INSTRUCTIONS
    )
    assert reply.usage is not None
    assert count.input_tokens == reply.usage.input_tokens == 7
    # the provider judges its own fields: its refusal passes through as it sent it
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.input_tokens.count(
            model="gpt-5.4-mini", input=INPUT, extra_body={"max_output_tokens": 16}
        )
    assert info.value.param == "max_output_tokens"  # type: ignore[attr-defined]
    assert (await emulator.last())["path"] == "/v1/responses/input_tokens"


async def test_a_claude_models_count_is_anthropics(rgw: Gw, emulator: Emulator) -> None:
    client = rgw.openai(await rgw.create_key())
    raw = await client.responses.input_tokens.with_raw_response.count(
        model="claude-sonnet",
        input=[{"role": "user", "content": INPUT}],
        instructions=INSTRUCTIONS,
        tools=TOOLS,
        tool_choice="auto",
        truncation="auto",
    )
    count = await counted(raw)
    last = await emulator.last()
    assert last["path"] == "/v1/messages/count_tokens"
    sent = last["body"]
    # what Anthropic's count takes, translated; nothing it would refuse (max_tokens)
    assert set(sent) == {"model", "messages", "system", "tools", "tool_choice"}
    assert sent["model"] == "claude-sonnet-5" and sent["system"] == INSTRUCTIONS
    assert sent["tools"][0]["name"] == "get_weather"
    assert "x-tollway-count" not in raw.headers
    assert PROVIDER_ID.match(raw.headers["x-upstream-request-id"])
    reply = await client.responses.create(
        model="claude-sonnet", input=INPUT, instructions=INSTRUCTIONS
    )
    assert reply.usage is not None
    assert count.input_tokens == reply.usage.input_tokens == 7


async def test_a_chat_only_models_count_is_an_estimate(rgw: Gw, emulator: Emulator) -> None:
    client = rgw.openai(await rgw.create_key())
    await emulator.reset()
    raw = await client.responses.input_tokens.with_raw_response.count(
        model="gpt-compat", input=INPUT, instructions=INSTRUCTIONS, tools=TOOLS
    )
    assert raw.headers["x-tollway-count"] == "estimate"
    assert raw.headers["x-tollway-model"] == "gpt-compat"
    chars = len(INPUT) + len(INSTRUCTIONS) + len(TOOLS[0]["description"])
    assert (await counted(raw)).input_tokens == math.ceil(chars / 4) == 15
    assert (await emulator.stats())["requests"] == 0  # nothing reached a provider


@pytest.mark.parametrize("model", ["claude-sonnet", "gpt-compat"])
async def test_a_translated_route_refuses_what_it_cannot_count(rgw: Gw, model: str) -> None:
    """What ``/v1/responses`` would refuse for the model, and a field the count does not
    take, is a 400 naming the field: never dropped, never a 500."""
    client = rgw.openai(await rgw.create_key())
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"extra_body": {"stream": True}}, "stream"),
        ({"extra_body": {"max_output_tokens": 50}}, "max_output_tokens"),
        ({"previous_response_id": "resp_nobody"}, "previous_response_id"),  # no plugin
    ]
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            await client.responses.input_tokens.count(model=model, input=INPUT, **fields)
        assert info.value.param == param, info.value.body  # type: ignore[attr-defined]
        assert info.value.body["type"] == "invalid_request_error"  # type: ignore[index]


async def test_errors_are_openai_shaped(rgw: Gw) -> None:
    client = rgw.openai(await rgw.create_key())
    count = client.responses.input_tokens.count
    with pytest.raises(openai.NotFoundError) as missing:
        await count(model="claude-nothing", input=INPUT)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        await rgw.openai("tw_wrong").responses.input_tokens.count(model="gpt-5.4-mini")
    with pytest.raises(openai.BadRequestError) as no_model:
        await count(input=INPUT)
    assert no_model.value.param == "model"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as no_input:  # Anthropic counts messages
        await count(model="claude-sonnet", instructions=INSTRUCTIONS)
    assert no_input.value.param == "input"  # type: ignore[attr-defined]
    # Anthropic's own refusal comes back in OpenAI's shape
    with pytest.raises(openai.RateLimitError) as limited:
        await count(model="claude-sonnet", input=INPUT, extra_headers={"x-emulator-status": "429"})
    assert set(limited.value.body) == {"message", "type", "param", "code"}  # type: ignore[arg-type]
    async with rgw.http.post(
        f"{rgw.url}/v1/responses/input_tokens",
        headers={"Authorization": "Bearer " + await rgw.create_key(), "content-type": "json"},
        data=b"[",
    ) as r:
        assert r.status == 400
        body = await r.json()
    assert body["error"]["type"] == "invalid_request_error"
    async with rgw.http.get(f"{rgw.url}/v1/responses/input_tokens") as r:
        assert r.status == 405 and "POST" in r.headers["Allow"]


async def test_previous_response_id_counts_the_next_turn(
    make_gateway: Any, emulator: Emulator
) -> None:
    """With the ``responses`` plugin, a count continuing a stored conversation counts it all:
    on a translated route the plugin expands the earlier turns, as for a response."""
    gw = await make_gateway([{"name": "auth"}, {"name": "responses"}], base=BASE)
    client = gw.openai(await gw.create_key())
    first = await client.responses.create(model="claude-sonnet", input=INPUT)
    alone = await client.responses.input_tokens.count(model="claude-sonnet", input="and now")
    after = await client.responses.input_tokens.count(
        model="claude-sonnet", input="and now", previous_response_id=first.id
    )
    sent = (await emulator.last())["body"]
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert after.input_tokens > alone.input_tokens == 2
    native = await client.responses.create(model="gpt-5.4-mini", input=INPUT)
    await client.responses.input_tokens.count(
        model="gpt-5.4-mini", input="and now", previous_response_id=native.id
    )
    assert (await emulator.last())["body"]["previous_response_id"] == native.id  # its own
    with pytest.raises(openai.NotFoundError):
        await client.responses.input_tokens.count(
            model="claude-sonnet", input="x", previous_response_id="resp_nobody"
        )


async def test_counts_are_zero_price_rows_and_take_no_quota(
    make_gateway: Any, tmp_path: Path
) -> None:
    base = policy(
        BASE,
        features={"code_suggestions": {"price_per_request": 0.02}},
        tiers={"free": {"requests_per_month": 1, "requests_per_minute": 4}},
    )
    db = tmp_path / "usage.duckdb"
    gw = await make_gateway(
        [
            {"name": "auth"},
            {"name": "limits"},
            {"name": "metering", "config": {"database": str(db), "flush_interval": "50ms"}},
        ],
        base=base,
    )
    client = gw.openai(await gw.create_key("cal", "free"))
    counts = {}
    for model in ("gpt-5.4-mini", "claude-sonnet", "gpt-compat"):
        counts[model] = (
            await client.responses.input_tokens.count(model=model, input=INPUT)
        ).input_tokens
    with pytest.raises(openai.PermissionDeniedError):  # the plan's features apply
        await client.responses.input_tokens.count(
            model="gpt-5.4-mini",
            input=INPUT,
            extra_headers={"X-Tollway-Feature": "code_suggestions"},
        )
    # three counts took no place in the quota of 1: a response still fits (the 4th request
    # in the minute, the refused one aside); the next, a count, is over the limit of 4
    await client.responses.create(model="gpt-5.4-mini", input=INPUT)
    with pytest.raises(openai.RateLimitError):
        await client.responses.input_tokens.count(model="gpt-5.4-mini", input=INPUT)
    async with gw.http.post(
        f"{gw.url}/admin/sql",
        json={
            "query": "SELECT endpoint, model, status, input_tokens, output_tokens, "
            "usage_estimated, cost_usd, price_usd FROM usage ORDER BY ts"
        },
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ) as r:
        res = await r.json()
    rows = [dict(zip(res["columns"], row, strict=True)) for row in res["rows"]]
    assert [(r["endpoint"], r["model"], r["status"]) for r in rows] == [
        ("input_tokens", "gpt-5.4-mini", 200),
        ("input_tokens", "claude-sonnet", 200),
        ("input_tokens", "gpt-compat", 200),
        ("input_tokens", "gpt-5.4-mini", 403),
        ("responses", "gpt-5.4-mini", 200),
        ("input_tokens", "gpt-5.4-mini", 429),
    ]
    for row in rows[:3]:
        assert row["input_tokens"] == counts[row["model"]] and row["output_tokens"] == 0
        assert float(row["cost_usd"]) == float(row["price_usd"]) == 0.0
        assert row["usage_estimated"] is (row["model"] == "gpt-compat")
    assert float(rows[4]["price_usd"]) == 0.01


async def test_the_emulator_counts_as_its_responses_report(emulator: Emulator) -> None:
    """The provider the tests count against: every field optional as in the API, the count
    what the response then reports, and the API's refusals."""
    client = openai.AsyncOpenAI(
        base_url=f"{emulator.url}/v1", api_key="upstream-secret", max_retries=0
    )
    async with client:
        count = client.responses.input_tokens.count
        assert (await count()).input_tokens == 1  # nothing to read: at least 1
        first = await client.responses.create(model="m", input=INPUT, instructions=INSTRUCTIONS)
        assert first.usage is not None
        assert (await count(input=INPUT, instructions=INSTRUCTIONS)).input_tokens == (
            first.usage.input_tokens
        )
        follow = await count(input="and now", previous_response_id=first.id)
        reply = await client.responses.create(
            model="m", input="and now", previous_response_id=first.id
        )
        assert reply.usage is not None and follow.input_tokens == reply.usage.input_tokens
        refusals: list[tuple[dict[str, Any], str, type[Exception]]] = [
            ({"extra_body": {"stream": True}}, "stream", openai.BadRequestError),
            ({"tools": [{"type": "nothing"}]}, "tools[0].type", openai.BadRequestError),
            ({"previous_response_id": "resp_x"}, "previous_response_id", openai.NotFoundError),
            (
                {"previous_response_id": first.id, "conversation": "conv_1"},
                "conversation",
                openai.BadRequestError,
            ),
        ]
        for fields, param, error in refusals:
            with pytest.raises(error) as info:
                await count(input=INPUT, **fields)
            assert info.value.param == param  # type: ignore[attr-defined]
