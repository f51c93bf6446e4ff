"""The gateway through the official SDKs: both endpoints, both dialects, streams, errors."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest

from proxy.context import RequestContext
from proxy.hookspecs import hookimpl
from tests.conftest import Emulator, Gw

MSG = [{"role": "user", "content": "hello gateway"}]


class UsageLog:
    """A throwaway plugin recording what log hooks see."""

    seen: list[RequestContext]

    def __init__(self, config: Any, policy: Any) -> None:
        self.seen = UsageLog.seen

    @hookimpl
    async def log(self, ctx: RequestContext) -> None:
        self.seen.append(ctx)


@pytest.fixture
async def logged(make_gateway: Any) -> tuple[Gw, list[RequestContext], str]:
    UsageLog.seen = []
    gw = await make_gateway(
        "chain:\n  - name: auth\n  - name: usagelog\n", extra_plugins={"usagelog": UsageLog}
    )
    return gw, UsageLog.seen, await gw.create_key()


async def test_openai_chat_non_stream(gw: Gw, key: str, emulator: Emulator) -> None:
    raw = await gw.openai(key).chat.completions.with_raw_response.create(
        model="gpt-5.4-mini",
        messages=MSG,  # type: ignore[arg-type]
    )
    reply = raw.parse()
    assert "hello gateway" in (reply.choices[0].message.content or "")
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    assert raw.headers["x-tollway-model"] == "gpt-5.4-mini"
    assert raw.headers["x-request-id"].startswith("req_")
    last = await emulator.last()
    assert last["path"] == "/v1/chat/completions"
    # the provider key is injected, the client's gateway key never leaves the gateway
    assert last["headers"]["authorization"] == "Bearer upstream-secret"
    assert key not in str(last["headers"])


async def test_hop_by_hop_and_gateway_headers_not_forwarded(
    gw: Gw, key: str, emulator: Emulator
) -> None:
    async with gw.http.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "gpt-5.4-mini", "messages": MSG},
        headers={
            "Authorization": f"Bearer {key}",
            "Connection": "keep-alive, x-secret-hop",
            "Keep-Alive": "timeout=5",
            "X-Tollway-Feature": "basic_suggestions",
            "Cookie": "session=abc",
            "X-Forwarded-For": "10.1.2.3",
            "TE": "trailers",
            "X-Secret-Hop": "not for the provider",
            "X-Custom-Trace": "kept",
        },
    ) as r:
        assert r.status == 200
    sent = (await emulator.last())["headers"]
    for name in ("keep-alive", "x-tollway-feature", "cookie", "x-forwarded-for", "te", "x-api-key"):
        assert name not in sent, name
    assert "x-secret-hop" not in sent  # listed in Connection: hop-by-hop for this request
    assert sent.get("connection", "keep-alive").lower() == "keep-alive"
    assert sent["x-custom-trace"] == "kept"


async def test_openai_stream_usage_only_when_asked(
    logged: tuple[Gw, list[RequestContext], str], emulator: Emulator
) -> None:
    gw, seen, key = logged
    client = gw.openai(key)
    chunks = [
        c
        async for c in await client.chat.completions.create(
            model="gpt-5.4-mini", messages=MSG, stream=True
        )
    ]  # type: ignore[arg-type]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "hello gateway" in text
    assert all(c.choices for c in chunks), "a usage chunk leaked to a client that did not ask"
    # ... but the gateway asked the provider for usage and recorded it
    assert (await emulator.last())["body"]["stream_options"] == {"include_usage": True}
    assert seen[-1].usage.reported and seen[-1].usage.output_tokens > 0

    chunks = [
        c
        async for c in await client.chat.completions.create(
            model="gpt-5.4-mini",
            messages=MSG,
            stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == seen[-1].usage.output_tokens


async def test_anthropic_messages_native(
    logged: tuple[Gw, list[RequestContext], str], emulator: Emulator
) -> None:
    gw, seen, key = logged
    client = gw.anthropic(key)
    msg = await client.messages.create(model="claude-sonnet", max_tokens=100, messages=MSG)  # type: ignore[arg-type]
    assert "hello gateway" in msg.content[0].text  # type: ignore[union-attr]
    last = await emulator.last()
    assert last["path"] == "/v1/messages" and last["body"]["model"] == "claude-sonnet-5"
    assert last["headers"]["x-api-key"] == "upstream-secret"
    assert seen[-1].usage.input_tokens == msg.usage.input_tokens

    async with client.messages.stream(model="claude-sonnet", max_tokens=100, messages=MSG) as s:  # type: ignore[arg-type]
        text = "".join([t async for t in s.text_stream])
        final = await s.get_final_message()
    assert "hello gateway" in text
    assert seen[-1].usage.output_tokens == final.usage.output_tokens > 0
    assert seen[-1].usage.input_tokens == final.usage.input_tokens > 0


async def test_openai_client_to_anthropic_model(
    logged: tuple[Gw, list[RequestContext], str], emulator: Emulator
) -> None:
    gw, seen, key = logged
    client = gw.openai(key)
    reply = await client.chat.completions.create(
        model="claude-sonnet",
        messages=[{"role": "system", "content": "be brief"}, *MSG],  # type: ignore[list-item]
    )
    last = await emulator.last()
    assert last["path"] == "/v1/messages"
    assert last["body"]["system"] == "be brief"
    assert last["body"]["max_tokens"] == 4096  # the provider's default_max_tokens
    assert "hello gateway" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens == seen[-1].usage.output_tokens

    stream = await client.chat.completions.create(
        model="claude-sonnet",
        messages=MSG,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "hello gateway" in text
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0
    assert seen[-1].usage.output_tokens == chunks[-1].usage.completion_tokens


async def test_anthropic_client_to_openai_model(
    logged: tuple[Gw, list[RequestContext], str], emulator: Emulator
) -> None:
    gw, seen, key = logged
    client = gw.anthropic(key)
    msg = await client.messages.create(
        model="gpt-5.4-mini",
        max_tokens=50,
        system="be brief",
        messages=MSG,  # type: ignore[arg-type]
    )
    last = await emulator.last()
    assert last["path"] == "/v1/chat/completions"
    assert last["body"]["messages"][0] == {"role": "system", "content": "be brief"}
    assert "hello gateway" in msg.content[0].text  # type: ignore[union-attr]
    assert msg.stop_reason == "end_turn"
    async with client.messages.stream(model="gpt-5.4-mini", max_tokens=50, messages=MSG) as s:  # type: ignore[arg-type]
        text = "".join([t async for t in s.text_stream])
        final = await s.get_final_message()
    assert "hello gateway" in text
    assert final.usage.output_tokens == seen[-1].usage.output_tokens > 0


async def test_tool_calls_translate_both_ways(gw: Gw, key: str) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "w",
                "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
            },
        }
    ]
    reply = await gw.openai(key).chat.completions.create(
        model="claude-sonnet",
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=tools,  # type: ignore[arg-type]
    )
    call = reply.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert reply.choices[0].finish_reason == "tool_calls"
    msg = await gw.anthropic(key).messages.create(
        model="gpt-5.4-mini",
        max_tokens=50,
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=[
            {
                "name": "get_weather",
                "description": "w",
                "input_schema": {"type": "object", "properties": {}},
            }
        ],
    )
    assert msg.stop_reason == "tool_use"
    assert msg.content[-1].type == "tool_use" and msg.content[-1].name == "get_weather"


async def test_embeddings_and_completions(gw: Gw, key: str, emulator: Emulator) -> None:
    client = gw.openai(key)
    emb = await client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) > 0
    assert emb.data[0].embedding != emb.data[1].embedding
    comp = await client.completions.create(model="gpt-5.4-mini", prompt="say hello")
    assert "say hello" in comp.choices[0].text
    with pytest.raises(openai.BadRequestError) as info:
        await client.embeddings.create(model="claude-sonnet", input="x")
    assert info.value.code == "unsupported_endpoint"


async def test_models_list_both_sdks(gw: Gw, key: str) -> None:
    ids = [m.id async for m in gw.openai(key).models.list()]
    assert ids == ["gpt-5.4-mini", "claude-sonnet", "text-embedding-3-small"]
    ant = [m.id async for m in gw.anthropic(key).models.list()]
    assert ant == ids
    with pytest.raises(openai.AuthenticationError):
        await gw.openai("tw_wrong").models.list()


async def test_errors_are_typed_sdk_exceptions(gw: Gw, key: str) -> None:
    with pytest.raises(openai.AuthenticationError) as e1:
        await gw.openai("tw_not_a_key").chat.completions.create(model="gpt-5.4-mini", messages=MSG)  # type: ignore[arg-type]
    assert e1.value.code == "invalid_api_key"
    with pytest.raises(anthropic.AuthenticationError):
        await gw.anthropic("tw_not_a_key").messages.create(
            model="claude-sonnet", max_tokens=5, messages=MSG
        )  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError) as e2:
        await gw.openai(key).chat.completions.create(model="gpt-0", messages=MSG)  # type: ignore[arg-type]
    assert e2.value.code == "model_not_found"
    with pytest.raises(anthropic.NotFoundError):
        await gw.anthropic(key).messages.create(model="gpt-0", max_tokens=5, messages=MSG)  # type: ignore[arg-type]


async def test_upstream_errors_reach_sdk_typed(gw: Gw, key: str) -> None:
    with pytest.raises(openai.RateLimitError) as e1:
        await gw.openai(key).chat.completions.create(
            model="gpt-5.4-mini",
            messages=MSG,  # type: ignore[arg-type]
            extra_headers={"x-emulator-status": "429", "x-emulator-retry-after": "30"},
        )
    assert e1.value.response.headers["retry-after"] == "30"  # more than the cap: not retried
    # an OpenAI-provider error translated for an Anthropic client, and the reverse
    with pytest.raises(anthropic.InternalServerError):
        await gw.anthropic(key).messages.create(
            model="gpt-5.4-mini",
            max_tokens=5,
            messages=MSG,  # type: ignore[arg-type]
            extra_headers={"x-emulator-status": "500", "x-emulator-retry-after": "60"},
        )
    with pytest.raises(openai.BadRequestError):
        await gw.openai(key).chat.completions.create(
            model="claude-sonnet",
            messages=MSG,  # type: ignore[arg-type]
            extra_headers={"x-emulator-status": "400"},
        )


async def test_retries_before_first_byte(
    logged: tuple[Gw, list[RequestContext], str], emulator: Emulator
) -> None:
    gw, seen, key = logged
    await emulator.reset()
    reply = await gw.openai(key).chat.completions.create(
        model="gpt-5.4-mini",
        messages=MSG,  # type: ignore[arg-type]
        extra_headers={
            "x-emulator-fail-times": "2",
            "x-emulator-key": "retry-1",
            "x-emulator-status": "503",
        },
    )
    assert "hello gateway" in (reply.choices[0].message.content or "")
    assert (await emulator.stats())["requests"] == 3
    assert seen[-1].retries == 2
    # a stream retried too, since nothing was sent to the client yet
    stream = await gw.openai(key).chat.completions.create(
        model="gpt-5.4-mini",
        messages=MSG,
        stream=True,  # type: ignore[arg-type]
        extra_headers={
            "x-emulator-fail-times": "1",
            "x-emulator-key": "retry-2",
            "x-emulator-status": "429",
            "x-emulator-retry-after": "0",
        },
    )
    assert "hello gateway" in "".join(
        [c.choices[0].delta.content or "" async for c in stream if c.choices]
    )
