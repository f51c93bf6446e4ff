"""The upstream emulator, driven by the real openai and anthropic SDKs.

The gateway's tests and benchmarks trust the emulator to speak the providers' wire formats, so
these tests use the official clients unchanged: if an SDK parses a reply, the format is right.
Raw aiohttp requests check what the SDKs hide (exact SSE framing, error bodies).
"""

from __future__ import annotations

import asyncio
import base64
import math
import struct
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import aiohttp
import anthropic
import httpx2
import openai
import orjson
import pydantic
import pytest
import pytest_asyncio
from aiohttp import web
from openai.types.responses import Response, ResponseStreamEvent

from proxy.emulator import create_emulator_app
from tests.procs import until

pytestmark = pytest.mark.asyncio(loop_scope="session")

CHAT: Any = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there"},
]
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
        },
    }
]


async def _start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def url() -> AsyncIterator[str]:
    runner, base = await _start(create_emulator_app())
    yield base
    await runner.cleanup()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def oai(url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    yield client
    await client.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def ant(url: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)
    yield client
    await client.close()


async def _get(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as resp:
        assert resp.status == 200
        return await resp.json()


async def _post_raw(
    http: aiohttp.ClientSession, url: str, body: bytes, **headers: str
) -> tuple[int, bytes]:
    async with http.post(url, data=body, headers=headers) as resp:
        return resp.status, await resp.read()


def _events(raw: bytes) -> list[tuple[str | None, bytes]]:
    """Split an SSE body into (event name, data) pairs."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        name, data = None, b""
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:].encode()
        out.append((name, data))
    return out


# ---- OpenAI chat -------------------------------------------------------------------------------


async def test_chat_non_stream(oai: openai.AsyncOpenAI, http: aiohttp.ClientSession, url: str):
    resp = await oai.chat.completions.create(model="gpt-4o-mini", messages=CHAT)
    assert resp.object == "chat.completion" and resp.model == "gpt-4o-mini"
    assert resp.id.startswith("chatcmpl-") and resp.created > 0
    choice = resp.choices[0]
    assert (choice.message.role, choice.message.content) == ("assistant", "Echo: hello there")
    assert choice.finish_reason == "stop"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (4, 3)
    assert resp.usage.total_tokens == 7
    again = await oai.chat.completions.create(model="gpt-4o-mini", messages=CHAT)
    assert again.choices[0].message.content == choice.message.content
    last = await _get(http, f"{url}/_emulator/last")
    assert last["path"] == "/v1/chat/completions"
    assert last["headers"]["authorization"] == "Bearer x"
    assert last["body"]["messages"] == CHAT


async def test_chat_length_controls(oai: openai.AsyncOpenAI):
    long = await oai.chat.completions.create(
        model="m",
        messages=CHAT,
        extra_headers={"x-emulator-words": "50"},
    )
    text = long.choices[0].message.content or ""
    assert len(text.split()) == 50 and text.startswith("Echo: hello there ")
    assert long.usage is not None and long.usage.completion_tokens == 50
    cut = await oai.chat.completions.create(model="m", messages=CHAT, max_tokens=2)
    assert cut.choices[0].message.content == "Echo: hello"
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage is not None and cut.usage.completion_tokens == 2
    cut2 = await oai.chat.completions.create(model="m", messages=CHAT, max_completion_tokens=1)
    assert cut2.choices[0].message.content == "Echo:"
    assert cut2.choices[0].finish_reason == "length"


async def test_chat_stream_without_usage(oai: openai.AsyncOpenAI):
    stream = await oai.chat.completions.create(model="gpt-4o", messages=CHAT, stream=True)
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Echo: hello there"
    assert [c.choices[0].finish_reason for c in chunks][-2:] == [None, "stop"]
    assert all(c.usage is None and c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].model == "gpt-4o"


async def test_chat_stream_include_usage(
    oai: openai.AsyncOpenAI, http: aiohttp.ClientSession, url: str
):
    stream = await oai.chat.completions.create(
        model="gpt-4o",
        messages=CHAT,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == "Echo: hello there"
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (4, 3)
    assert all(c.usage is None for c in chunks[:-1])
    # On the wire every chunk carries an explicit "usage": null, and the stream ends in [DONE].
    body = orjson.dumps(
        {"model": "m", "messages": CHAT, "stream": True, "stream_options": {"include_usage": True}}
    )
    status, raw = await _post_raw(http, f"{url}/v1/chat/completions", body)
    assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
    payloads = [orjson.loads(d) for _, d in _events(raw)[:-1]]
    assert all("usage" in p for p in payloads)
    assert [p["usage"] is None for p in payloads] == [True] * (len(payloads) - 1) + [False]


async def test_chat_tool_call(oai: openai.AsyncOpenAI):
    ask: Any = [{"role": "user", "content": "What's the weather in Tokyo?"}]
    resp = await oai.chat.completions.create(model="m", messages=ask, tools=TOOLS)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = (choice.message.tool_calls or [])[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert orjson.loads(call.function.arguments) == {"location": "Tokyo"}  # type: ignore[union-attr]
    # Streamed: the id and name come first, then the arguments in pieces.
    stream = await oai.chat.completions.create(model="m", messages=ask, tools=TOOLS, stream=True)
    deltas = [c.choices[0] async for c in stream]
    first = (deltas[0].delta.tool_calls or [])[0]
    assert (first.id or "").startswith("call_") and first.type == "function"
    assert first.function is not None and first.function.name == "get_weather"
    args = "".join(
        (tc.function.arguments or "") if tc.function else ""
        for d in deltas
        for tc in d.delta.tool_calls or []
    )
    assert orjson.loads(args) == {"location": "Tokyo"} and len(deltas) > 3
    assert deltas[-1].finish_reason == "tool_calls"
    # Without the trigger word, or once the tool has answered, the reply is text.
    plain = await oai.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        tools=TOOLS,
    )
    assert plain.choices[0].message.content == "Echo: hi"
    followup: Any = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    done = await oai.chat.completions.create(model="m", messages=followup, tools=TOOLS)
    assert done.choices[0].finish_reason == "stop" and not done.choices[0].message.tool_calls
    assert done.choices[0].message.content == "Echo: What's the weather in Tokyo?"


# ---- OpenAI completions, embeddings, models ----------------------------------------------------


async def test_completions(oai: openai.AsyncOpenAI):
    resp = await oai.completions.create(model="davinci", prompt="say hi")
    assert resp.object == "text_completion" and resp.choices[0].text == "Echo: say hi"
    assert resp.usage is not None and resp.usage.total_tokens == 2 + 3
    multi = await oai.completions.create(model="davinci", prompt=["a", "b c"], max_tokens=2)
    assert [(c.index, c.text, c.finish_reason) for c in multi.choices] == [
        (0, "Echo: a", "stop"),
        (1, "Echo: b", "length"),
    ]
    stream = await oai.completions.create(
        model="davinci", prompt="say hi", stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Echo: say hi"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3


async def test_embeddings(oai: openai.AsyncOpenAI, http: aiohttp.ClientSession, url: str):
    texts = ["alpha", "beta gamma", "alpha"]
    batch = await oai.embeddings.create(model="text-embedding-3-small", input=texts)
    vectors = [d.embedding for d in batch.data]
    assert [d.index for d in batch.data] == [0, 1, 2] and batch.model == "text-embedding-3-small"
    assert all(len(v) == 8 and math.isclose(math.hypot(*v), 1.0, rel_tol=1e-6) for v in vectors)
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
    assert batch.usage.prompt_tokens == 4 and batch.usage.total_tokens == 4
    last = await _get(http, f"{url}/_emulator/last")
    assert last["body"]["encoding_format"] == "base64"  # the SDK's default, decoded for us
    for text, vector in zip(texts, vectors, strict=True):
        single = await oai.embeddings.create(model="e", input=text, encoding_format="float")
        assert single.data[0].embedding == vector  # float and base64 decode identically
    wide = await oai.embeddings.create(model="e", input=[[1, 2, 3], [4]], dimensions=16)
    assert [len(d.embedding) for d in wide.data] == [16, 16] and wide.usage.prompt_tokens == 4
    # The wire format really is little-endian float32 base64.
    body = orjson.dumps({"model": "e", "input": "alpha", "encoding_format": "base64"})
    status, raw = await _post_raw(http, f"{url}/v1/embeddings", body)
    encoded = orjson.loads(raw)["data"][0]["embedding"]
    assert status == 200 and isinstance(encoded, str)
    assert list(struct.unpack("<8f", base64.b64decode(encoded))) == vectors[0]


async def test_models(oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic):
    ids = [m.id async for m in oai.models.list()]
    assert "gpt-4o-mini" in ids and "text-embedding-3-small" in ids
    claude = [m.id async for m in ant.models.list()]
    assert claude and all(i.startswith("claude") for i in claude)


# ---- Anthropic messages ------------------------------------------------------------------------


async def test_messages_non_stream(
    ant: anthropic.AsyncAnthropic, http: aiohttp.ClientSession, url: str
):
    msg = await ant.messages.create(
        model="claude-sonnet-4-6",
        max_tokens=100,
        system=[{"type": "text", "text": "be brief"}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
    )
    assert msg.id.startswith("msg_") and msg.model == "claude-sonnet-4-6"
    assert msg.content[0].type == "text" and msg.content[0].text == "Echo: hello there"
    assert (msg.stop_reason, msg.stop_sequence) == ("end_turn", None)
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (4, 3)
    last = await _get(http, f"{url}/_emulator/last")
    # This SDK generation sends the key as a Bearer token (older ones used x-api-key).
    assert last["headers"]["authorization"] == "Bearer x" and "anthropic-version" in last["headers"]
    cut = await ant.messages.create(
        model="c", max_tokens=2, system="sys", messages=[{"role": "user", "content": "hello there"}]
    )
    assert cut.content[0].text == "Echo: hello" and cut.stop_reason == "max_tokens"  # type: ignore[union-attr]
    assert (cut.usage.input_tokens, cut.usage.output_tokens) == (3, 2)


async def test_messages_stream(
    ant: anthropic.AsyncAnthropic, http: aiohttp.ClientSession, url: str
):
    async with ant.messages.stream(
        model="claude-haiku-4-5",
        max_tokens=100,
        messages=[{"role": "user", "content": "hello there"}],
        extra_headers={"x-emulator-words": "20"},
    ) as stream:
        pieces = [t async for t in stream.text_stream]
        final = await stream.get_final_message()
    assert len(pieces) == 20 and "".join(pieces) == final.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn" and final.model == "claude-haiku-4-5"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (2, 20)
    # The raw event sequence is Anthropic's.
    body = orjson.dumps(
        {
            "model": "c",
            "max_tokens": 9,
            "stream": True,
            "messages": [{"role": "user", "content": "a b"}],
        }
    )
    status, raw = await _post_raw(http, f"{url}/v1/messages", body)
    events = _events(raw)
    assert status == 200
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(orjson.loads(data)["type"] == name for name, data in events)
    start = orjson.loads(events[0][1])["message"]
    assert start["usage"]["input_tokens"] == 2 and start["usage"]["output_tokens"] == 1
    assert orjson.loads(events[-2][1])["usage"]["output_tokens"] == 3


async def test_messages_tool_use(ant: anthropic.AsyncAnthropic):
    tools: Any = [{"name": "lookup_weather", "input_schema": {"type": "object"}}]
    ask: Any = [{"role": "user", "content": "Weather for Rome please"}]
    msg = await ant.messages.create(model="c", max_tokens=50, messages=ask, tools=tools)
    block = msg.content[0]
    assert msg.stop_reason == "tool_use" and block.type == "tool_use"
    assert block.name == "lookup_weather" and block.input == {"location": "Rome"}
    assert block.id.startswith("toolu_")
    async with ant.messages.stream(model="c", max_tokens=50, messages=ask, tools=tools) as stream:
        final = await stream.get_final_message()
    streamed = final.content[0]
    assert final.stop_reason == "tool_use" and streamed.type == "tool_use"
    assert streamed.input == {"location": "Rome"}
    result: Any = [
        *ask,
        {"role": "assistant", "content": [block.model_dump()]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "hot"}],
        },
    ]
    answer = await ant.messages.create(model="c", max_tokens=50, messages=result, tools=tools)
    assert answer.stop_reason == "end_turn" and answer.content[0].type == "text"


# ---- errors and fault injection ----------------------------------------------------------------


async def test_bad_requests_use_the_route_error_shape(http: aiohttp.ClientSession, url: str):
    status, raw = await _post_raw(http, f"{url}/v1/chat/completions", b"{nope")
    err = orjson.loads(raw)["error"]
    assert (
        status == 400
        and err["type"] == "invalid_request_error"
        and set(err)
        == {
            "message",
            "type",
            "param",
            "code",
        }
    )
    status, raw = await _post_raw(http, f"{url}/v1/messages", b"[1, 2]")
    assert status == 400 and orjson.loads(raw)["type"] == "error"
    no_max = orjson.dumps({"model": "c", "messages": [{"role": "user", "content": "x"}]})
    status, raw = await _post_raw(http, f"{url}/v1/messages", no_max)
    err = orjson.loads(raw)
    assert status == 400 and err["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in err["error"]["message"]
    status, raw = await _post_raw(http, f"{url}/v1/nowhere", b"{}")
    assert status == 404 and "error" in orjson.loads(raw)


async def test_injected_errors_are_typed(oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic):
    headers = {"x-emulator-status": "429", "x-emulator-retry-after": "7"}
    with pytest.raises(openai.RateLimitError) as exc_info:
        await oai.chat.completions.create(model="m", messages=CHAT, extra_headers=headers)
    assert exc_info.value.response.headers["retry-after"] == "7"
    assert exc_info.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.InternalServerError):
        await oai.embeddings.create(
            model="e", input="x", extra_headers={"x-emulator-status": "503"}
        )
    ask: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(anthropic.RateLimitError) as ant_info:
        await ant.messages.create(model="c", max_tokens=5, messages=ask, extra_headers=headers)
    assert ant_info.value.response.headers["retry-after"] == "7"
    assert ant_info.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    with pytest.raises(anthropic.OverloadedError) as overloaded:
        await ant.messages.create(
            model="c", max_tokens=5, messages=ask, extra_headers={"x-emulator-status": "529"}
        )
    assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


async def test_fail_times_then_success(oai: openai.AsyncOpenAI):
    def headers(key: str) -> dict[str, str]:
        return {"x-emulator-fail-times": "2", "x-emulator-key": key, "x-emulator-status": "503"}

    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as exc_info:
            await oai.chat.completions.create(model="m", messages=CHAT, extra_headers=headers("k1"))
        assert exc_info.value.status_code == 503
    ok = await oai.chat.completions.create(model="m", messages=CHAT, extra_headers=headers("k1"))
    assert ok.choices[0].message.content == "Echo: hello there"
    with pytest.raises(openai.InternalServerError):  # another key has its own budget
        await oai.chat.completions.create(model="m", messages=CHAT, extra_headers=headers("k2"))


async def test_stats_and_reset(oai: openai.AsyncOpenAI, http: aiohttp.ClientSession, url: str):
    async with http.post(f"{url}/_emulator/reset") as resp:
        assert resp.status == 200
    assert await _get(http, f"{url}/_emulator/stats") == {
        "requests": 0,
        "by_path": {},
        "in_flight": 0,
    }
    await oai.chat.completions.create(model="m", messages=CHAT)
    await oai.chat.completions.create(model="m", messages=CHAT)
    await oai.embeddings.create(model="e", input="x")
    stats = await _get(http, f"{url}/_emulator/stats")
    assert stats["requests"] == 3 and stats["in_flight"] == 0
    assert stats["by_path"] == {"/v1/chat/completions": 2, "/v1/embeddings": 1}
    async with http.post(f"{url}/_emulator/reset") as resp:
        assert resp.status == 200
    assert (await _get(http, f"{url}/_emulator/stats"))["requests"] == 0


async def test_hang_cancelled_by_client_timeout(
    oai: openai.AsyncOpenAI, http: aiohttp.ClientSession, url: str
):
    hung = asyncio.create_task(
        oai.with_options(timeout=0.4).chat.completions.create(
            model="m",
            messages=CHAT,
            extra_headers={"x-emulator-hang": "1"},
        )
    )
    stats = f"{url}/_emulator/stats"

    async def in_flight() -> int:
        return int((await _get(http, stats))["in_flight"])

    await until(in_flight, what="the hung request at the emulator")
    assert (await _get(http, f"{url}/_emulator/stats"))["in_flight"] == 1
    with pytest.raises(openai.APITimeoutError):
        await hung

    async def idle() -> bool:
        return await in_flight() == 0

    await until(idle, 2.0, "the hung request cancelled at the emulator")
    assert (await _get(http, f"{url}/_emulator/stats"))["in_flight"] == 0


async def test_latency_and_slow_model(oai: openai.AsyncOpenAI):
    started = time.monotonic()
    await oai.chat.completions.create(
        model="m",
        messages=CHAT,
        extra_headers={"x-emulator-latency-ms": "150"},
    )
    assert time.monotonic() - started >= 0.15
    started = time.monotonic()
    resp = await oai.chat.completions.create(model="emu-slow-150", messages=CHAT)
    assert time.monotonic() - started >= 0.15 and resp.model == "emu-slow-150"
    started = time.monotonic()  # the header wins over the model name
    await oai.chat.completions.create(
        model="emu-slow-5000", messages=CHAT, extra_headers={"x-emulator-latency-ms": "0"}
    )
    assert time.monotonic() - started < 2.5


async def test_chunk_delay_spreads_the_stream(oai: openai.AsyncOpenAI):
    stream = await oai.chat.completions.create(
        model="m",
        messages=CHAT,
        stream=True,
        extra_headers={"x-emulator-chunk-delay-ms": "40", "x-emulator-words": "4"},
    )
    arrivals = [time.monotonic() async for _ in stream]
    assert len(arrivals) == 6  # role, 4 words, finish
    assert arrivals[-1] - arrivals[0] >= 0.15


async def test_stream_abort(oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic):
    headers = {"x-emulator-stream-abort-after": "3", "x-emulator-words": "30"}
    received = []
    with pytest.raises(openai.APIConnectionError):
        stream = await oai.chat.completions.create(
            model="m",
            messages=CHAT,
            stream=True,
            extra_headers=headers,
        )
        async for chunk in stream:
            received.append(chunk)
    assert len(received) == 3
    seen = []
    with pytest.raises((anthropic.APIConnectionError, httpx2.TransportError)):
        async with ant.messages.stream(
            model="c",
            max_tokens=50,
            messages=[{"role": "user", "content": "x"}],
            extra_headers=headers,
        ) as ant_stream:
            async for event in ant_stream:
                seen.append(event.type)
    # Three raw events got through (message_start, content_block_start, ping; the SDK hides ping).
    assert seen == ["message_start", "content_block_start"]


async def test_api_key_is_enforced():
    runner, base = await _start(create_emulator_app(api_key="sekrit"))
    try:
        for key, ok in (("wrong", False), ("sekrit", True)):
            oai = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
            ant = anthropic.AsyncAnthropic(base_url=base, api_key=key, max_retries=0)
            try:
                if ok:
                    resp = await oai.chat.completions.create(model="m", messages=CHAT)
                    assert resp.choices[0].message.content == "Echo: hello there"
                    msg = await ant.messages.create(
                        model="c", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
                    )
                    assert msg.content[0].text == "Echo: hi"  # type: ignore[union-attr]
                else:
                    with pytest.raises(openai.AuthenticationError):
                        await oai.chat.completions.create(model="m", messages=CHAT)
                    with pytest.raises(anthropic.AuthenticationError) as exc_info:
                        await ant.messages.create(
                            model="c", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
                        )
                    assert exc_info.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
            finally:
                await oai.close()
                await ant.close()
        # Anthropic's own header works too, and is checked on /v1/messages only.
        async with aiohttp.ClientSession() as http:
            body = orjson.dumps({"model": "c", "max_tokens": 5, "messages": CHAT[1:]})
            for headers, expected in (({"x-api-key": "sekrit"}, 200), ({"x-api-key": "no"}, 401)):
                status, _ = await _post_raw(http, f"{base}/v1/messages", body, **headers)
                assert status == expected
            status, _ = await _post_raw(
                http,
                f"{base}/v1/chat/completions",
                orjson.dumps({"model": "m", "messages": CHAT}),
                **{"x-api-key": "sekrit"},
            )
            assert status == 401
    finally:
        await runner.cleanup()


# ---- OpenAI Responses --------------------------------------------------------------------------

RESPONSE_TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
        "strict": False,
    }
]
_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)


class Forecast(pydantic.BaseModel):
    city: str
    days: int
    tags: list[str]
    unit: Literal["c", "f"]
    note: str | None


async def _response_events(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], **headers: str
) -> list[tuple[str | None, dict[str, Any]]]:
    """A streamed response's raw events, each validated against the openai SDK's types."""
    status, raw = await _post_raw(
        http, f"{url}/v1/responses", orjson.dumps({**body, "stream": True}), **headers
    )
    assert status == 200, raw
    events = [(name, orjson.loads(data)) for name, data in _events(raw)]
    for name, data in events:
        assert name == data["type"]  # every event is named, as OpenAI streams them
        _EVENT.validate_python(data)
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    return events


async def test_responses_whole_reply_fits_the_sdk_type(
    oai: openai.AsyncOpenAI, http: aiohttp.ClientSession, url: str
):
    body = {"model": "gpt-4o-mini", "input": "hello there", "instructions": "be brief"}
    status, raw = await _post_raw(http, f"{url}/v1/responses", orjson.dumps(body))
    assert status == 200
    resp = Response.model_validate_json(raw)  # validated, not merely constructed
    assert resp.id.startswith("resp_") and resp.status == "completed" and resp.store
    assert resp.output_text == "Echo: hello there"
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.total_tokens) == (
        4,
        3,
        7,
    )
    via_sdk = await oai.responses.create(model="gpt-4o-mini", input="hello there")
    assert via_sdk.output_text == "Echo: hello there"
    assert via_sdk.output[0].type == "message" and via_sdk.output[0].status == "completed"


async def test_responses_stream_event_sequence(
    oai: openai.AsyncOpenAI, http: aiohttp.ClientSession, url: str
):
    events = await _response_events(http, url, {"model": "m", "input": "hello there"})
    kinds = [name for name, _ in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[0][1]["response"]["usage"] is None
    final = events[-1][1]["response"]
    assert final["usage"]["output_tokens"] == 3 and final["status"] == "completed"
    deltas = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    assert deltas == "Echo: hello there" == final["output"][0]["content"][0]["text"]
    async with oai.responses.stream(model="m", input="hello there friend") as stream:
        texts = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        done = await stream.get_final_response()
    assert "".join(texts) == done.output_text == "Echo: hello there friend"
    assert done.usage is not None and done.usage.output_tokens == 4


async def test_responses_max_output_tokens_is_incomplete(
    oai: openai.AsyncOpenAI, http: aiohttp.ClientSession, url: str
):
    words = {"x-emulator-words": "40"}
    resp = await oai.responses.create(
        model="m", input="hi", max_output_tokens=16, extra_headers=words
    )
    assert resp.status == "incomplete"
    assert resp.incomplete_details is not None
    assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage is not None and resp.usage.output_tokens == 16
    events = await _response_events(
        http, url, {"model": "m", "input": "hi", "max_output_tokens": 16}, **words
    )
    assert events[-1][0] == "response.incomplete"
    with pytest.raises(openai.BadRequestError) as info:
        await oai.responses.create(model="m", input="hi", max_output_tokens=5)
    assert info.value.body["param"] == "max_output_tokens"  # type: ignore[index]


async def test_responses_function_call_and_its_output(
    oai: openai.AsyncOpenAI, http: aiohttp.ClientSession, url: str
):
    ask = "what is the weather in Lisbon?"
    call = await oai.responses.create(model="m", input=ask, tools=RESPONSE_TOOLS)
    item = call.output[0]
    assert item.type == "function_call" and item.name == "get_weather"
    assert orjson.loads(item.arguments) == {"location": "Lisbon"}
    events = await _response_events(
        http, url, {"model": "m", "input": ask, "tools": RESPONSE_TOOLS}
    )
    pieces = [d["delta"] for n, d in events if n == "response.function_call_arguments.delta"]
    assert orjson.loads("".join(pieces)) == {"location": "Lisbon"}
    follow = await oai.responses.create(
        model="m",
        previous_response_id=call.id,
        input=[{"type": "function_call_output", "call_id": item.call_id, "output": "sunny"}],
        tools=RESPONSE_TOOLS,
    )
    assert follow.output_text == f"Echo: {ask}"  # text, not another call
    assert follow.previous_response_id == call.id
    assert follow.usage is not None and call.usage is not None
    # the earlier turn (question and call) counts as input again
    assert follow.usage.input_tokens == call.usage.input_tokens + 1 + 1


async def test_responses_structured_output(oai: openai.AsyncOpenAI):
    parsed = await oai.responses.parse(model="m", input="plan a trip", text_format=Forecast)
    assert parsed.output_parsed is not None
    assert parsed.output_parsed.city == "Echo: plan a trip"
    assert parsed.output_parsed.unit == "c" and parsed.output_parsed.tags
    async with oai.responses.stream(model="m", input="x", text_format=Forecast) as stream:
        final = await stream.get_final_response()
    assert final.output_parsed is not None and final.output_parsed.days == 0
    loose = await oai.responses.create(
        model="m", input="hi", text={"format": {"type": "json_object"}}
    )
    assert orjson.loads(loose.output_text) == {"echo": "Echo: hi"}
    chat = await oai.chat.completions.parse(
        model="m", messages=[{"role": "user", "content": "go"}], response_format=Forecast
    )
    assert chat.choices[0].message.parsed is not None


async def test_responses_store_retrieve_delete_and_input_items(oai: openai.AsyncOpenAI):
    items: Any = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "input_text", "text": "one"}]},
        {"type": "message", "role": "user", "content": "two"},
    ]
    resp = await oai.responses.create(model="m", input=items)
    got = await oai.responses.retrieve(resp.id)
    assert got.id == resp.id and got.output_text == "Echo: two"
    page = await oai.responses.input_items.list(resp.id)
    assert [i.type for i in page.data] == ["message"] * 3
    assert [i.content[0].text for i in page.data] == ["two", "one", "be brief"]  # type: ignore[union-attr]
    first = await oai.responses.input_items.list(resp.id, order="asc", limit=2)
    assert first.has_more and len(first.data) == 2
    rest = await oai.responses.input_items.list(resp.id, order="asc", after=first.data[-1].id)
    assert [i.content[0].text for i in rest.data] == ["two"] and not rest.has_more  # type: ignore[union-attr]
    await oai.responses.delete(resp.id)
    for fetch in (oai.responses.retrieve, oai.responses.delete, oai.responses.input_items.list):
        with pytest.raises(openai.NotFoundError):
            await fetch(resp.id)
    unstored = await oai.responses.create(model="m", input="x", store=False)
    with pytest.raises(openai.NotFoundError):
        await oai.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError) as info:
        await oai.responses.create(model="m", input="x", previous_response_id=unstored.id)
    assert info.value.body["param"] == "previous_response_id"  # type: ignore[index]


async def test_responses_conversation_continues(oai: openai.AsyncOpenAI):
    first = await oai.responses.create(model="m", input="alpha beta")
    second = await oai.responses.create(model="m", input="gamma", previous_response_id=first.id)
    assert second.output_text == "Echo: gamma"
    assert first.usage is not None and second.usage is not None
    # alpha beta (2) + Echo: alpha beta (3) + gamma (1)
    assert (first.usage.input_tokens, second.usage.input_tokens) == (2, 6)


async def test_responses_web_search_and_bad_input(
    oai: openai.AsyncOpenAI, http: aiohttp.ClientSession, url: str
):
    tools: Any = [{"type": "web_search"}]
    resp = await oai.responses.create(model="m", input="search news", tools=tools)
    assert [o.type for o in resp.output] == ["web_search_call", "message"]
    events = await _response_events(http, url, {"model": "m", "input": "news", "tools": tools})
    assert "response.web_search_call.searching" in [n for n, _ in events]
    bad: list[tuple[dict[str, Any], str]] = [
        ({"model": "m"}, "input"),
        ({"model": "m", "input": [{"type": "nope"}]}, "input[0].type"),
        ({"model": "m", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"model": "m", "input": "x", "tools": [{"type": "telepathy"}]}, "tools[0].type"),
        (
            {"model": "m", "input": "x", "text": {"format": {"type": "json_schema"}}},
            "text.format.name",
        ),
        ({"input": "x"}, "model"),
    ]
    for body, param in bad:
        status, raw = await _post_raw(http, f"{url}/v1/responses", orjson.dumps(body))
        err = orjson.loads(raw)["error"]
        assert (status, err["param"], err["type"]) == (400, param, "invalid_request_error"), body


async def test_responses_controls_apply(oai: openai.AsyncOpenAI):
    with pytest.raises(openai.RateLimitError):
        await oai.responses.create(model="m", input="x", extra_headers={"x-emulator-status": "429"})
    seen = []
    with pytest.raises(openai.APIConnectionError):
        stream = await oai.responses.create(
            model="m",
            input="x",
            stream=True,
            extra_headers={"x-emulator-stream-abort-after": "4", "x-emulator-words": "20"},
        )
        async for event in stream:
            seen.append(event.type)
    assert len(seen) == 4


# ---- tool use: tool_choice and parallel calls, alike in all three APIs (emulator.tools) ---------

_CITY_SCHEMA: Any = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
CHAT_TWO_TOOLS: list[Any] = [
    *TOOLS,
    {"type": "function", "function": {"name": "get_time", "parameters": _CITY_SCHEMA}},
]
RESPONSE_TWO_TOOLS: list[Any] = [
    *RESPONSE_TOOLS,
    {"type": "function", "name": "get_time", "parameters": _CITY_SCHEMA, "strict": True},
]
MESSAGE_TWO_TOOLS: list[Any] = [
    {"name": "get_weather", "input_schema": {"type": "object"}},
    {"name": "get_time", "input_schema": _CITY_SCHEMA},
]
BOTH = "Use get_time and get_weather for Oslo"  # names both tools: one call each
PLAIN = "hello there"  # names no tool and is not about the weather


def _chat_calls(resp: Any) -> list[tuple[str, Any]]:
    calls = resp.choices[0].message.tool_calls or []
    return [(c.function.name, orjson.loads(c.function.arguments)) for c in calls]


async def test_chat_tool_choice_and_parallel_calls(oai: openai.AsyncOpenAI, http, url: str):
    async def ask(text: str, **kw: Any) -> Any:
        return await oai.chat.completions.create(
            model="m", messages=[{"role": "user", "content": text}], tools=CHAT_TWO_TOOLS, **kw
        )

    weather = "What's the weather in Oslo?"
    assert (await ask(weather, tool_choice="none")).choices[0].message.content == f"Echo: {weather}"
    assert _chat_calls(await ask(PLAIN)) == []  # auto: nothing asks for a tool
    # required: a call even so, of the first tool; arguments fit its schema
    assert _chat_calls(await ask(PLAIN, tool_choice="required")) == [
        ("get_weather", {"location": PLAIN})
    ]
    forced: Any = {"type": "function", "function": {"name": "get_time"}}
    resp = await ask(weather, tool_choice=forced)  # the weather asked, the time forced
    assert _chat_calls(resp) == [("get_time", {"city": "Oslo", "days": 0})]
    # both named: two calls, in the order of the tools; one when parallel calls are off
    both = await ask(BOTH)
    assert [c[0] for c in _chat_calls(both)] == ["get_weather", "get_time"]
    assert both.choices[0].finish_reason == "tool_calls"
    assert both.usage is not None and both.usage.completion_tokens == 2  # a word per call's JSON
    assert _chat_calls(await ask(BOTH, parallel_tool_calls=False)) == [
        ("get_weather", {"location": "Oslo"})
    ]
    # streamed: each call opens with its index, id and name, then its arguments in pieces
    stream = await ask(BOTH, stream=True)
    calls: dict[int, dict[str, str]] = {}
    async for chunk in stream:
        for tc in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"name": "", "arguments": "", "id": ""})
            call["id"] += tc.id or ""
            call["name"] += (tc.function.name or "") if tc.function else ""
            call["arguments"] += (tc.function.arguments or "") if tc.function else ""
    assert [(c["name"], orjson.loads(c["arguments"])) for c in calls.values()] == _chat_calls(both)
    assert len({c["id"] for c in calls.values()}) == 2
    # a forced tool is called again after its output, as a provider forces it; auto answers
    call = (resp.choices[0].message.tool_calls or [])[0]
    followup: Any = [
        {"role": "user", "content": weather},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "noon"},
    ]
    again = await oai.chat.completions.create(
        model="m", messages=followup, tools=CHAT_TWO_TOOLS, tool_choice=forced
    )
    assert [c[0] for c in _chat_calls(again)] == ["get_time"]
    # a tool that is not offered cannot be forced, nor any tool without tools
    for body in (
        {"tools": CHAT_TWO_TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
        {"tool_choice": "required"},
    ):
        payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
        status, raw = await _post_raw(http, f"{url}/v1/chat/completions", orjson.dumps(payload))
        assert status == 400 and orjson.loads(raw)["error"]["param"] == "tool_choice"


async def test_messages_tool_choice_and_parallel_calls(ant: anthropic.AsyncAnthropic):
    async def ask(text: str, **kw: Any) -> Any:
        return await ant.messages.create(
            model="c",
            max_tokens=2000,
            messages=[{"role": "user", "content": text}],
            tools=MESSAGE_TWO_TOOLS,
            **kw,
        )

    def uses(msg: Any) -> list[tuple[str, Any]]:
        return [(b.name, b.input) for b in msg.content if b.type == "tool_use"]

    weather = "Weather for Oslo please"
    assert (await ask(weather, tool_choice={"type": "none"})).stop_reason == "end_turn"
    assert uses(await ask(PLAIN)) == []
    anyone = await ask(PLAIN, tool_choice={"type": "any"})  # Anthropic's required
    assert uses(anyone) == [("get_weather", {"location": "Paris"})]  # no place named
    forced = await ask(weather, tool_choice={"type": "tool", "name": "get_time"})
    assert uses(forced) == [("get_time", {"city": "Oslo", "days": 0})]
    both = await ask(BOTH)
    assert both.stop_reason == "tool_use"
    assert uses(both) == [
        ("get_weather", {"location": "Oslo"}),
        ("get_time", {"city": "Oslo", "days": 0}),
    ]
    assert len({b.id for b in both.content}) == 2
    single = await ask(BOTH, tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert uses(single) == uses(both)[:1]
    # streamed with thinking first: blocks 0 (thinking), 1 and 2 (the calls), as sent whole
    thinking: Any = {"type": "enabled", "budget_tokens": 1024}
    async with ant.messages.stream(
        model="c",
        max_tokens=2000,
        messages=[{"role": "user", "content": BOTH}],
        tools=MESSAGE_TWO_TOOLS,
        thinking=thinking,
    ) as stream:
        final = await stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "tool_use", "tool_use"]
    assert uses(final) == uses(both)
    with pytest.raises(anthropic.BadRequestError):
        await ask(weather, tool_choice={"type": "tool", "name": "nothing"})


async def test_responses_tool_choice_and_parallel_calls(
    oai: openai.AsyncOpenAI, http: aiohttp.ClientSession, url: str
):
    async def ask(text: str, **kw: Any) -> Response:
        return await oai.responses.create(model="m", input=text, tools=RESPONSE_TWO_TOOLS, **kw)

    def calls(resp: Response) -> list[tuple[str, Any]]:
        return [
            (i.name, orjson.loads(i.arguments)) for i in resp.output if i.type == "function_call"
        ]

    weather = "what is the weather in Oslo?"
    assert (await ask(weather, tool_choice="none")).output_text == f"Echo: {weather}"
    assert calls(await ask(PLAIN)) == []
    assert calls(await ask(PLAIN, tool_choice="required")) == [("get_weather", {"location": PLAIN})]
    forced = await ask(weather, tool_choice={"type": "function", "name": "get_time"})
    assert calls(forced) == [("get_time", {"city": "Oslo", "days": 0})]
    both = await ask(BOTH)
    assert calls(both) == [
        ("get_weather", {"location": "Oslo"}),
        ("get_time", {"city": "Oslo", "days": 0}),
    ]
    assert len({i.call_id for i in both.output if i.type == "function_call"}) == 2
    assert calls(await ask(BOTH, parallel_tool_calls=False)) == calls(both)[:1]
    events = await _response_events(
        http, url, {"model": "m", "input": BOTH, "tools": RESPONSE_TWO_TOOLS}
    )
    done = [d["arguments"] for n, d in events if n == "response.function_call_arguments.done"]
    assert [orjson.loads(a) for a in done] == [args for _, args in calls(both)]
    assert [d["output_index"] for n, d in events if n == "response.output_item.added"] == [0, 1]
    # after the tools' outputs, auto answers in text
    outputs: Any = [
        {"type": "function_call_output", "call_id": i.call_id, "output": "ok"}
        for i in both.output
        if i.type == "function_call"
    ]
    follow = await oai.responses.create(
        model="m", previous_response_id=both.id, input=outputs, tools=RESPONSE_TWO_TOOLS
    )
    assert follow.output_text == f"Echo: {BOTH}"
    status, raw = await _post_raw(
        http,
        f"{url}/v1/responses",
        orjson.dumps({"model": "m", "input": "hi", "tool_choice": "required"}),
    )
    assert status == 400 and orjson.loads(raw)["error"]["param"] == "tool_choice"
