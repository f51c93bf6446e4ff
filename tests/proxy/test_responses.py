"""``POST /v1/responses`` through the gateway, driven by the official openai SDK.

One policy, three routes: an OpenAI provider serving the Responses API (passed through), an
OpenAI-compatible provider with only chat completions (``responses: chat``: translated) and a
Claude model (translated through chat to messages). The emulator serves all three, so each
test checks both what the client got and what the provider was sent.
"""

from __future__ import annotations

from typing import Any, Literal

import openai
import orjson
import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from proxy.policy import PolicyError, load_text
from tests.conftest import Emulator, Gw, policy, policy_text

COMPAT: dict[str, Any] = {
    "kind": "openai",
    "base_url": "{emu}/v1",
    "api_key": "upstream-secret",
    "responses": "chat",
    "retries": {"attempts": 2, "backoff": "10ms"},
    "timeout": {"connect": "2s", "read": "5s"},
}
BASE = policy(
    providers={"compat": COMPAT},
    models={
        "gpt-compat": {
            "provider": "compat",
            "upstream_model": "gpt-4o-mini",
            "input_per_mtok": 0.5,
            "output_per_mtok": 1.5,
        }
    },
)
# the model a client names -> the provider path and model the emulator saw
ROUTES = {
    "gpt-5.4-mini": ("/v1/responses", "gpt-5.4-mini"),
    "gpt-compat": ("/v1/chat/completions", "gpt-4o-mini"),
    "claude-sonnet": ("/v1/messages", "claude-sonnet-5"),
}
TRANSLATED = ("gpt-compat", "claude-sonnet")
TOOLS: Any = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
            "additionalProperties": False,
        },
        "strict": True,
    }
]
_EVENT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(ResponseStreamEvent)


class Forecast(pydantic.BaseModel):
    city: str
    days: int
    unit: Literal["c", "f"]


@pytest.fixture
async def rgw(make_gateway: Any) -> Gw:
    return await make_gateway(base=BASE)  # type: ignore[no-any-return]


async def raw_events(gw: Gw, key: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A streamed reply's events as sent (name, data), each validated as the SDK's type."""
    async with gw.http.post(
        f"{gw.url}/v1/responses",
        json={**body, "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    ) as r:
        assert r.status == 200, await r.text()
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = await r.read()
    events = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        assert "event" in lines, block  # Responses events are named, unlike chat's
        data = orjson.loads(lines["data"])
        assert data["type"] == lines["event"]
        _EVENT.validate_python(data)
        events.append((lines["event"], data))
    return events


@pytest.mark.parametrize("model", ROUTES)
async def test_whole_reply(rgw: Gw, emulator: Emulator, model: str) -> None:
    key = await rgw.create_key()
    raw = await rgw.openai(key).responses.with_raw_response.create(
        model=model, input="hello gateway", instructions="be brief"
    )
    assert raw.headers["x-tollway-model"] == model
    reply = Response.model_validate_json(raw.content)  # validated, not merely constructed
    assert reply.status == "completed" and reply.output_text == "Echo: hello gateway"
    assert reply.usage is not None
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (4, 3)
    assert reply.id.startswith("resp_")
    if model in TRANSLATED:  # a gateway-made id, as long as OpenAI's
        assert len(reply.id) == 53 and reply.model == model
    path, upstream_model = ROUTES[model]
    last = await emulator.last()
    assert (last["path"], last["body"]["model"]) == (path, upstream_model)
    if model == "gpt-5.4-mini":  # passed through as sent
        assert last["body"]["input"] == "hello gateway"
        assert last["body"]["instructions"] == "be brief"


@pytest.mark.parametrize("model", ROUTES)
async def test_stream(rgw: Gw, emulator: Emulator, model: str) -> None:
    key = await rgw.create_key()
    async with rgw.openai(key).responses.stream(model=model, input="hello stream") as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Echo: hello stream"
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (2, 3)
    events = await raw_events(rgw, key, {"model": model, "input": "hello stream"})
    names = [name for name, _ in events]
    assert names[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert names[-1] == "response.completed" and names.count("response.completed") == 1
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    assert (await emulator.last())["path"] == ROUTES[model][0]


@pytest.mark.parametrize("model", ROUTES)
async def test_function_call_round_trip(rgw: Gw, model: str) -> None:
    client = rgw.openai(await rgw.create_key())
    ask = "what is the weather in Oslo?"
    first = await client.responses.create(model=model, input=ask, tools=TOOLS)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert orjson.loads(calls[0].arguments) == {"location": "Oslo"}
    async with client.responses.stream(model=model, input=ask, tools=TOOLS) as stream:
        streamed = await stream.get_final_response()
    assert [i.type for i in streamed.output if i.type == "function_call"] == ["function_call"]
    # the next turn carries the conversation itself: question, call, the tool's output
    turn: Any = [
        {"role": "user", "content": ask},
        calls[0].model_dump(exclude_none=True, exclude={"status"}),
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21 C"},
    ]
    answer = await client.responses.create(model=model, input=turn, tools=TOOLS)
    assert [item.type for item in answer.output] == ["message"]  # an answer, not another call
    # the emulator's Claude echoes the tool result (the last user turn), the others the question
    assert answer.output_text in (f"Echo: {ask}", "Echo: sunny, 21 C")


@pytest.mark.parametrize("model", ROUTES)
async def test_structured_output(rgw: Gw, emulator: Emulator, model: str) -> None:
    client = rgw.openai(await rgw.create_key())
    parsed = await client.responses.parse(model=model, input="plan a trip", text_format=Forecast)
    assert parsed.output_parsed == Forecast(city="Echo: plan a trip", days=0, unit="c")
    async with client.responses.stream(model=model, input="x", text_format=Forecast) as stream:
        final = await stream.get_final_response()
    assert final.output_parsed is not None and final.output_parsed.unit == "c"


@pytest.mark.parametrize("model", ROUTES)
async def test_incomplete_at_max_output_tokens(rgw: Gw, model: str) -> None:
    client = rgw.openai(await rgw.create_key())
    words = {"x-emulator-words": "40"}
    reply = await client.responses.create(
        model=model, input="hi", max_output_tokens=16, extra_headers=words
    )
    assert reply.status == "incomplete"
    assert reply.incomplete_details is not None
    assert reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage is not None and reply.usage.output_tokens == 16
    stream = await client.responses.create(
        model=model, input="hi", max_output_tokens=16, extra_headers=words, stream=True
    )
    kinds = [event.type async for event in stream]
    assert kinds[-1] == "response.incomplete"


async def test_hosted_tools_pass_through_only_to_a_native_provider(
    rgw: Gw, emulator: Emulator
) -> None:
    client = rgw.openai(await rgw.create_key())
    search: Any = [{"type": "web_search"}]
    reply = await client.responses.create(model="gpt-5.4-mini", input="news today", tools=search)
    assert [item.type for item in reply.output] == ["web_search_call", "message"]
    assert (await emulator.last())["body"]["tools"] == search
    await emulator.reset()
    for model in TRANSLATED:
        tools: Any = [*TOOLS, {"type": "web_search"}]
        with pytest.raises(openai.BadRequestError) as info:
            await client.responses.create(model=model, input="news today", tools=tools)
        body: Any = info.value.body
        assert body["param"] == "tools[1].type", body
        assert body["type"] == "invalid_request_error"
        assert "tools[1].type" in body["message"]
    assert (await emulator.stats())["requests"] == 0  # refused before any provider call


async def test_bad_requests_in_openai_shape(rgw: Gw, emulator: Emulator) -> None:
    key = await rgw.create_key()
    headers = {"Authorization": f"Bearer {key}"}
    cases: list[tuple[Any, int, str | None]] = [
        ({"input": "x"}, 400, "model"),
        ({"model": "nope", "input": "x"}, 404, "model"),
        ({"model": "gpt-compat", "input": 42}, 400, None),
        ({"model": "claude-sonnet", "input": "x", "background": True}, 400, "background"),
    ]
    for body, status, param in cases:
        async with rgw.http.post(f"{rgw.url}/v1/responses", json=body, headers=headers) as r:
            err = (await r.json())["error"]
            assert r.status == status, (body, err)
            assert set(err) == {"message", "type", "param", "code"}
            if param is not None:
                assert err["param"] == param, (body, err)
    json_type = {**headers, "Content-Type": "application/json"}
    async with rgw.http.post(f"{rgw.url}/v1/responses", data=b"{nope", headers=json_type) as r:
        assert r.status == 400 and "error" in await r.json()
    # the native provider's own 400 reaches the client in the same shape
    with pytest.raises(openai.BadRequestError) as info:
        await rgw.openai(key).responses.create(
            model="gpt-5.4-mini",
            input=[{"type": "nonsense"}],  # type: ignore[list-item]
        )
    assert info.value.body["param"] == "input[0].type"  # type: ignore[index]


@pytest.mark.parametrize("model", ROUTES)
async def test_stream_cut_short_ends_with_an_error_event(rgw: Gw, model: str) -> None:
    key = await rgw.create_key()
    async with rgw.http.post(
        f"{rgw.url}/v1/responses",
        json={"model": model, "input": "x", "stream": True},
        headers={
            "Authorization": f"Bearer {key}",
            "x-emulator-stream-stop-after": "4",
            "x-emulator-words": "30",
        },
    ) as r:
        assert r.status == 200
        raw = (await r.read()).decode()
    last = raw.strip().split("\n\n")[-1]
    name = last.split("\n")[0]
    data = orjson.loads(last.split("data: ", 1)[1])
    _EVENT.validate_python(data)
    if model in TRANSLATED:  # the gateway's own response closes as failed
        assert name == "event: response.failed"
        error = data["response"]["error"]  # a code of OpenAI's, the message says what broke
        assert error["code"] == "server_error" and "ended the stream" in error["message"]
    else:  # a provider's response the gateway never built: an error event
        assert name == "event: error" and data["code"] == "upstream_stream_error"
    assert "response.completed" not in raw


def test_provider_field_is_checked() -> None:
    bad = policy(providers={"anthropic": {"responses": "native"}})
    with pytest.raises(PolicyError) as info:
        load_text(policy_text(bad, "http://127.0.0.1:1"))
    assert info.value.errors[0].startswith(
        "providers.anthropic.responses: native needs kind openai"
    )
    with pytest.raises(PolicyError) as info:
        load_text(policy_text(policy(providers={"openai": {"responses": "soap"}}), "http://x"))
    assert info.value.errors[0].startswith("providers.openai.responses:")
    routes = load_text(policy_text(BASE, "http://127.0.0.1:1")).policy.routes()
    assert [m for m, r in routes.items() if r.native_responses] == [
        "gpt-5.4-mini",
        "text-embedding-3-small",
    ]


@pytest.mark.parametrize("model", TRANSLATED)
async def test_previous_response_id_needs_the_state_plugin_on_translated_routes(
    rgw: Gw, emulator: Emulator, model: str
) -> None:
    client = rgw.openai(await rgw.create_key())
    await emulator.reset()
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model=model, input="and then?", previous_response_id="resp_1")
    assert info.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert (await emulator.stats())["requests"] == 0  # never dropped silently
    # a native provider keeps its own responses: the id goes to it (here: unknown, its 404)
    with pytest.raises(openai.NotFoundError) as missing:
        await client.responses.create(
            model="gpt-5.4-mini", input="and then?", previous_response_id="resp_1"
        )
    assert missing.value.body["param"] == "previous_response_id"  # type: ignore[index]


async def test_native_provider_continues_its_own_responses(rgw: Gw, emulator: Emulator) -> None:
    client = rgw.openai(await rgw.create_key())
    first = await client.responses.create(model="gpt-5.4-mini", input="alpha beta")
    second = await client.responses.create(
        model="gpt-5.4-mini", input="gamma", previous_response_id=first.id
    )
    assert (await emulator.last())["body"]["previous_response_id"] == first.id
    assert second.previous_response_id == first.id and second.output_text == "Echo: gamma"
    assert second.usage is not None  # alpha beta, Echo: alpha beta, gamma: the provider's turns
    assert second.usage.input_tokens == 6
