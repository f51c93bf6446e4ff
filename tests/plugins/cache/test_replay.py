"""The cache's canonical reply: stream -> whole body -> stream, checked against the SDKs' own types.

``Assembler`` over ``replay(body)`` must give ``body`` back (minus what a stream cannot carry), and
what the official SDKs accumulate from ``replay(body)`` must match what they parse from ``body``:
a cache hit served as a stream has to be indistinguishable from the reply that filled it.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import TypeAdapter

from plugins.cache.replay import PIECE_CHARS, Assembler, replay
from proxy import sse, translate
from proxy.tokens import reply_tokens

LONG = "Héllo wörld — 你好世界! 🎉👩‍👩‍👧 naïve café " * 6 + "\n\nend."
ARGS = orjson.dumps({"city": "Zürich", "notes": "東京 " * 20, "days": [1, 2, 3]}).decode()
OPENAI_USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 40,
    "total_tokens": 52,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
}


def chat(*choices: dict[str, Any], **extra: Any) -> dict[str, Any]:
    body = {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [{"index": i, "logprobs": None, **c} for i, c in enumerate(choices)],
        "usage": OPENAI_USAGE,
    }
    return {**body, **extra}


def msg(content: Any = None, **fields: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content, "refusal": None, "annotations": [], **fields}


def call(id: str, name: str, args: str) -> dict[str, Any]:
    return {"id": id, "type": "function", "function": {"name": name, "arguments": args}}


CHAT = {
    "text": chat(
        {"message": msg(LONG), "finish_reason": "stop"},
        system_fingerprint="fp_123",
        service_tier="default",
    ),
    "tools": chat(
        {
            "message": msg(
                None, tool_calls=[call("call_1", "weather", ARGS), call("call_2", "t", "{}")]
            ),
            "finish_reason": "tool_calls",
        }
    ),
    "text+tool": chat(
        {
            "message": msg("Checking.", tool_calls=[call("call_9", "x", "{}")]),
            "finish_reason": "tool_calls",
        }
    ),
    "n=2": chat(
        {"message": msg(LONG), "finish_reason": "stop"},
        {"message": msg("short ✓"), "finish_reason": "length"},
    ),
    "empty": chat({"message": msg(""), "finish_reason": "stop"}, system_fingerprint=None),
    "refusal": chat(
        {"message": msg(None, refusal="I can't help with that."), "finish_reason": "stop"}
    ),
    "logprobs": chat(
        {
            "message": msg("Hi there"),
            "finish_reason": "stop",
            "logprobs": {
                "content": [
                    {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []},
                    {"token": " there", "logprob": -0.2, "bytes": None, "top_logprobs": []},
                ],
                "refusal": None,
            },
        }
    ),
    "function_call": chat(
        {
            "message": msg(None, function_call={"name": "f", "arguments": ARGS}),
            "finish_reason": "function_call",
        }
    ),
}

COMPLETIONS = {
    "text": {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1700000001,
        "model": "gpt-3.5-turbo-instruct",
        "system_fingerprint": "fp_9",
        "choices": [
            {
                "text": LONG,
                "index": 0,
                "logprobs": {
                    "tokens": ["Hé", "llo"],
                    "token_logprobs": [-0.5, -0.25],
                    "top_logprobs": [{"Hé": -0.5}, {"llo": -0.25}],
                    "text_offset": [0, 2],
                },
                "finish_reason": "length",
            },
            {"text": "", "index": 1, "logprobs": None, "finish_reason": "stop"},
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }
}


def message(content: list[dict[str, Any]], stop: str = "end_turn", **extra: Any) -> dict[str, Any]:
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 100,
            "output_tokens": 60,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 50,
            "service_tier": "standard",
        },
        **extra,
    }


CITATION = {
    "type": "char_location",
    "cited_text": "grass is green",
    "document_index": 0,
    "document_title": "Facts",
    "start_char_index": 0,
    "end_char_index": 14,
    "file_id": None,
}
MESSAGES = {
    "tools": message(
        [
            {"type": "text", "text": "I'll look up both. ☀️"},
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": orjson.loads(ARGS)},
            {"type": "tool_use", "id": "toolu_2", "name": "time", "input": {}},
        ],
        "tool_use",
    ),
    "thinking": message(
        [
            {"type": "thinking", "thinking": LONG, "signature": "sig" * 30},
            {"type": "redacted_thinking", "data": "opaque=="},
            {
                "type": "text",
                "text": LONG,
                "citations": [CITATION, {**CITATION, "document_index": 1}],
            },
        ]
    ),
    "empty": message([], "max_tokens"),
    "stop_sequence": message([{"type": "text", "text": "a"}], "stop_sequence", stop_sequence="###"),
}

CASES = (
    [("chat", k, b) for k, b in CHAT.items()]
    + [("completions", k, b) for k, b in COMPLETIONS.items()]
    + [("messages", k, b) for k, b in MESSAGES.items()]
)
EVENT = TypeAdapter(RawMessageStreamEvent)


def events(frames: list[bytes]) -> list[tuple[str | None, Any]]:
    """Parse frames the way the relay does; each frame must be exactly one whole event."""
    splitter = sse.EventSplitter()
    out = []
    for f in frames:
        raws = splitter.feed(f)
        assert len(raws) == 1 and f.endswith(b"\n\n")
        name, data = sse.parse_event(raws[0])
        out.append((name, None if data == sse.DONE else orjson.loads(data)))
    return out


def assemble(endpoint: str, evs: list[tuple[str | None, Any]], n: int = 1) -> dict[str, Any] | None:
    asm = Assembler(endpoint, n=n)
    for name, data in evs:
        if data is not None:
            asm.feed(name, data)
    return asm.result()


def visible(endpoint: str, body: dict[str, Any], include_usage: bool) -> dict[str, Any]:
    """The body minus the fields a stream does not carry (documented in plugins.cache.replay)."""
    body = copy.deepcopy(body)
    if endpoint == "chat":
        for choice in body["choices"]:
            choice["message"].pop("annotations", None)
            choice["message"].pop("audio", None)
    if endpoint != "messages" and not include_usage:
        body.pop("usage", None)
    return body


@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize(("endpoint", "case", "body"), CASES)
def test_round_trip(endpoint: str, case: str, body: dict[str, Any], include_usage: bool) -> None:
    frames = replay(endpoint, body, include_usage=include_usage)
    evs = events(frames)
    got = assemble(endpoint, evs, len(body.get("choices", ())) or 1)
    assert got == visible(endpoint, body, include_usage)
    # the assembled body is a valid whole reply for the SDK
    kind = {"chat": ChatCompletion, "completions": Completion, "messages": Message}[endpoint]
    kind.model_validate(got)
    assert frames == replay(endpoint, got, include_usage=include_usage)  # a fixed point


@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize(("case", "body"), CHAT.items())
def test_openai_sdk_accumulates_chat(case: str, body: dict[str, Any], include_usage: bool) -> None:
    evs = events(replay("chat", body, include_usage=include_usage))
    assert evs[-1] == (None, None)  # data: [DONE]
    chunks = [ChatCompletionChunk.model_validate(d) for _, d in evs[:-1]]
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
        assert ("usage" in chunk.model_fields_set) is include_usage  # "usage": null like OpenAI
    # the snapshot, not get_final_completion(): that one raises on finish_reason "length"
    final = state.current_completion_snapshot
    want = ChatCompletion.model_validate(body)
    assert (final.id, final.model, final.created) == (want.id, want.model, want.created)
    assert final.system_fingerprint == want.system_fingerprint
    assert final.service_tier == want.service_tier
    assert final.usage == (want.usage if include_usage else None)
    assert len(final.choices) == len(want.choices)
    for got, exp in zip(final.choices, want.choices, strict=True):
        assert got.index == exp.index and got.finish_reason == exp.finish_reason
        assert got.message.role == exp.message.role
        assert got.message.content == exp.message.content
        assert got.message.refusal == exp.message.refusal
        assert got.message.function_call == exp.message.function_call
        assert [
            (c.id, c.type, c.function.name, c.function.arguments)
            for c in got.message.tool_calls or ()
        ] == [
            (c.id, c.type, c.function.name, c.function.arguments)
            for c in exp.message.tool_calls or ()
        ]
        assert got.logprobs == exp.logprobs


def test_chat_stream_shape() -> None:
    evs = events(replay("chat", CHAT["tools"], include_usage=True))
    chunks = [d for _, d in evs[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {
        "role": "assistant",
        "content": None,
        "refusal": None,
    }
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[1:-2]]
    openers = [c for c in calls if "id" in c]
    assert [(c["index"], c["id"], c["type"], c["function"]) for c in openers] == [
        (0, "call_1", "function", {"name": "weather", "arguments": ""}),
        (1, "call_2", "function", {"name": "t", "arguments": ""}),
    ]
    assert all(set(c) == {"index", "function"} for c in calls if "id" not in c)
    assert all(len(c["function"]["arguments"]) <= PIECE_CHARS for c in calls)
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == OPENAI_USAGE
    assert all(c["usage"] is None for c in chunks[:-1])

    pieces = [
        c["choices"][0]["delta"].get("content")
        for _, c in events(replay("chat", CHAT["text"], include_usage=False))[1:-2]
    ]
    assert len(pieces) > 3 and all(0 < len(p) <= PIECE_CHARS for p in pieces)


def test_completions_chunks_are_sdk_shaped() -> None:
    body = COMPLETIONS["text"]
    evs = events(replay("completions", body, include_usage=True))
    assert evs[-1] == (None, None)
    texts: dict[int, str] = {}
    for _, data in evs[:-1]:
        # the SDK type requires finish_reason, though the API streams null until the end
        patched = {
            **data,
            "choices": [
                {**c, "finish_reason": c["finish_reason"] or "stop"} for c in data["choices"]
            ],
        }
        chunk = Completion.model_validate(patched)
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {c["index"]: c["text"] for c in body["choices"]}
    assert evs[-2][1]["choices"] == [] and evs[-2][1]["usage"] == body["usage"]


@pytest.mark.parametrize(("case", "body"), MESSAGES.items())
def test_anthropic_sdk_accumulates_messages(case: str, body: dict[str, Any]) -> None:
    evs = events(replay("messages", body, include_usage=False))
    snapshot = None
    bufs: dict[int, bytes] = {}
    for name, data in evs:
        event = EVENT.validate_python(data)
        assert event.type == name
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=bufs)
    assert snapshot is not None
    got = Message.model_validate(snapshot.to_dict()).model_dump()
    assert got == Message.model_validate(body).model_dump()

    names = [n for n, _ in evs]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    start = evs[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == 100 and start["usage"]["output_tokens"] == 0
    assert evs[-2][1]["usage"]["output_tokens"] == 60
    assert (
        names.count("content_block_start")
        == names.count("content_block_stop")
        == len(body["content"])
    )


@pytest.mark.parametrize(("case", "body"), MESSAGES.items())
def test_assembles_what_the_gateway_translates_to_chat(case: str, body: dict[str, Any]) -> None:
    """An OpenAI client of a Claude model: the cache sees translated chunks."""
    to_chat = translate.MessagesStreamToChat("alias", include_usage=True)
    asm = Assembler("chat")
    for name, data in events(replay("messages", body, include_usage=False)):
        for chunk in to_chat.feed(name, data):
            asm.feed(None, chunk)
    got = asm.result()
    want = translate.messages_response_to_chat(body, "alias")
    assert got is not None
    assert (got["choices"], got["id"]) == (want["choices"], want["id"])
    # the stream translator reports no cached-token details; the counts agree
    assert reply_tokens(got) == reply_tokens(want) == reply_tokens(body) is not None


@pytest.mark.parametrize(("case", "body"), CHAT.items())
def test_assembles_what_the_gateway_translates_to_messages(case: str, body: dict[str, Any]) -> None:
    """An Anthropic client of an OpenAI model: the cache sees translated events."""
    to_messages = translate.ChatStreamToMessages("alias")
    asm = Assembler("messages")
    for _, data in events(replay("chat", body, include_usage=True)):
        evs = to_messages.finish() if data is None else to_messages.feed(data)
        for name, ev in evs:
            asm.feed(name, ev)
    assert asm.result() == translate.chat_response_to_messages(body, "alias")


@pytest.mark.parametrize(("endpoint", "case", "body"), CASES)
def test_incomplete_or_failed_streams_are_not_replies(
    endpoint: str, case: str, body: dict[str, Any]
) -> None:
    evs = [e for e in events(replay(endpoint, body, include_usage=False)) if e[1] is not None]
    n = len(body.get("choices", ())) or 1
    assert assemble(endpoint, evs, n) is not None
    assert assemble(endpoint, evs[:-1], n) is None  # cut before the last finish / message_stop
    error: tuple[str | None, Any] = (
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
        if endpoint == "messages"
        else (
            None,
            {"error": {"message": "busy", "type": "server_error", "param": None, "code": None}},
        )
    )
    assert assemble(endpoint, [*evs[:2], error, *evs[2:]], n) is None
    assert assemble(endpoint, [], n) is None


def test_unfinished_second_choice_and_cut_tool_input() -> None:
    evs = [e for e in events(replay("chat", CHAT["n=2"], include_usage=False)) if e[1] is not None]
    assert assemble("chat", evs, n=2) is not None
    assert assemble("chat", evs, n=1) is None  # more choices than asked for: not this request's
    assert assemble("chat", [e for e in evs if e[1]["choices"][0]["index"] == 0], n=2) is None

    evs = events(replay("messages", MESSAGES["tools"], include_usage=False))
    json_deltas = [
        i for i, (_, d) in enumerate(evs) if d.get("delta", {}).get("type") == "input_json_delta"
    ]
    assert len(json_deltas) > 2
    assert assemble("messages", evs[: json_deltas[1]] + evs[json_deltas[1] + 1 :]) is None


def test_usage_of() -> None:
    """A hit is metered by the core's reader of a whole reply, reading the stored body's shape
    from its usage keys (a body without usage is metered as (0, 0))."""
    assert reply_tokens(CHAT["text"]) == (12, 40)
    assert reply_tokens(COMPLETIONS["text"]) == (5, 7)
    assert reply_tokens(MESSAGES["tools"]) == (150, 60)  # cache reads are input
    assert reply_tokens(CHAT["text"]) == reply_tokens(CHAT["text"], "openai")  # read by shape
    assert reply_tokens(MESSAGES["tools"]) == reply_tokens(MESSAGES["tools"], "anthropic")
    assert reply_tokens({"choices": []}) is None
    assert reply_tokens({"usage": None}) is None


def test_unknown_endpoint() -> None:
    with pytest.raises(ValueError):
        Assembler("embeddings")
    with pytest.raises(ValueError):
        replay("embeddings", {}, include_usage=False)
