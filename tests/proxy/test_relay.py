"""Usage read from a provider reply, whole or streamed: both dialects, cache tokens counted as
input, and whether the count is the provider's closing one (``ctx.usage.final``)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from proxy.context import Dialect, RequestContext, Route
from proxy.relay import _StreamState
from proxy.tokens import reply_tokens

OPENAI = {
    "id": "x",
    "object": "chat.completion",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": 'a "usage": {"prompt_tokens": 999} trap'},
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 12,
        "completion_tokens": 7,
        "total_tokens": 19,
        "prompt_tokens_details": {"cached_tokens": 3},
        "completion_tokens_details": {"reasoning_tokens": 2},
    },
}
ANTHROPIC = {
    "id": "m",
    "type": "message",
    "content": [{"type": "text", "text": '"input_tokens": 5'}],
    "usage": {
        "input_tokens": 10,
        "cache_creation_input_tokens": 4,
        "cache_read_input_tokens": 6,
        "output_tokens": 8,
    },
}


@pytest.mark.parametrize(
    ("kind", "body", "tokens"), [("openai", OPENAI, (12, 7)), ("anthropic", ANTHROPIC, (20, 8))]
)
def test_usage_of_a_whole_reply(
    kind: Dialect, body: dict[str, object], tokens: tuple[int, int]
) -> None:
    assert reply_tokens(body, kind) == tokens


def test_no_usage() -> None:
    assert reply_tokens({"id": "x", "choices": []}, "openai") is None
    assert reply_tokens({"id": "m", "usage": "not an object"}, "anthropic") is None


def relayed(kind: Dialect, dialect: Dialect, events: list[bytes], hooks: bool = False) -> Any:
    """``ctx.usage`` after relaying ``events`` (raw SSE events of a ``kind`` provider) to a
    ``dialect`` client, with or without a chunk hook (which makes the relay parse every event)."""
    ctx = RequestContext(
        request_id="r", endpoint="chat", dialect=dialect, request=None, client_ip="127.0.0.1"
    )
    chunk_hooks = ((0, lambda ctx, event: None),) if hooks else ()
    chain = SimpleNamespace(response_chunk=chunk_hooks, chunks_always=hooks)
    route = Route(model="m", provider="p", upstream_model="m", kind=kind)
    state = _StreamState(chain, ctx, route, wants_usage=False)  # type: ignore[arg-type]
    for raw in events:
        state.process(raw, [])
    return ctx.usage


ANTHROPIC_START = (
    b"event: message_start\ndata: "
    b'{"type":"message_start","message":{"id":"m","type":"message","role":"assistant",'
    b'"content":[],"usage":{"input_tokens":10,"cache_creation_input_tokens":4,'
    b'"cache_read_input_tokens":6,"output_tokens":1}}}'
)
ANTHROPIC_TEXT = (
    b"event: content_block_delta\ndata: "
    b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}'
)
ANTHROPIC_DELTA = (
    b"event: message_delta\ndata: "
    b'{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":8}}'
)


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
def test_anthropic_stream_usage(dialect: Dialect) -> None:
    """Passed through or translated, message_start's output count is a placeholder (not
    final) until message_delta brings the closing one."""
    usage = relayed("anthropic", dialect, [ANTHROPIC_START, ANTHROPIC_TEXT])
    assert (usage.input_tokens, usage.output_tokens, usage.reported, usage.final) == (
        20,
        1,
        True,
        False,
    )
    usage = relayed("anthropic", dialect, [ANTHROPIC_START, ANTHROPIC_TEXT, ANTHROPIC_DELTA])
    assert (usage.input_tokens, usage.output_tokens, usage.final) == (20, 8, True)


OPENAI_TEXT = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}],"usage":null}'
)
OPENAI_USAGE = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19,'
    b'"prompt_tokens_details":{"cached_tokens":3}}}'
)


@pytest.mark.parametrize("hooks", [False, True])
def test_openai_stream_usage(hooks: bool) -> None:
    """The usage chunk is found by a substring test without chunk hooks, parsed with them."""
    usage = relayed("openai", "openai", [OPENAI_TEXT], hooks)
    assert (usage.input_tokens, usage.output_tokens, usage.reported) == (0, 0, False)
    usage = relayed("openai", "openai", [OPENAI_TEXT, OPENAI_USAGE, b"data: [DONE]"], hooks)
    assert (usage.input_tokens, usage.output_tokens, usage.reported, usage.final) == (
        12,
        7,
        True,
        True,
    )
