"""The one reader of token usage: every shape of both dialects, whole replies and stream events.

Metering, limits and the cache all count what these functions read, so the shapes a provider
really sends are pinned here: details that are already inside a total, cache tokens that are
not, nulls and absent keys, and Anthropic's placeholder output count in ``message_start``.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.context import Usage
from proxy.tokens import (
    Tokens,
    anthropic_cached,
    anthropic_input,
    anthropic_tokens,
    openai_chunk_tokens,
    openai_tokens,
    read_anthropic_event,
    reply_tokens,
)
from proxy.translate import MessagesStreamToChat

# --- OpenAI usage objects -----------------------------------------------------------------------

CHAT_USAGE = {
    "prompt_tokens": 120,
    "completion_tokens": 45,
    "total_tokens": 165,
    "prompt_tokens_details": {"cached_tokens": 100, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 30, "audio_tokens": 0},
}


@pytest.mark.parametrize(
    ("usage", "tokens"),
    [
        # cached and reasoning tokens are inside the totals: never added again
        (CHAT_USAGE, (120, 45)),
        ({"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}, (5, 7)),  # completions
        ({"prompt_tokens": 8, "total_tokens": 8}, (8, 0)),  # embeddings: no output
        ({"prompt_tokens": None, "completion_tokens": None}, (0, 0)),
        ({}, (0, 0)),
        ({"prompt_tokens": 12.0, "completion_tokens": 3}, (12, 3)),
    ],
)
def test_openai_usage(usage: dict[str, Any], tokens: Tokens) -> None:
    got = openai_tokens(usage)
    assert got == tokens and all(type(n) is int for n in got)


# --- Anthropic usage objects --------------------------------------------------------------------

MESSAGE_USAGE = {
    "input_tokens": 10,
    "cache_creation_input_tokens": 4,
    "cache_read_input_tokens": 6,
    "output_tokens": 8,
    "server_tool_use": {"web_search_requests": 1},
    "service_tier": "standard",
}


@pytest.mark.parametrize(
    ("usage", "tokens", "cached"),
    [
        (MESSAGE_USAGE, (20, 8), 6),  # cache writes and reads are input
        ({"input_tokens": 10, "output_tokens": 8}, (10, 8), 0),
        (
            {
                "input_tokens": 10,
                "cache_creation_input_tokens": None,
                "cache_read_input_tokens": None,
                "output_tokens": None,
            },
            (10, 0),
            0,
        ),
        ({}, (0, 0), 0),
    ],
)
def test_anthropic_usage(usage: dict[str, Any], tokens: Tokens, cached: int) -> None:
    assert anthropic_tokens(usage) == tokens
    assert anthropic_input(usage) == tokens[0]
    assert anthropic_cached(usage) == cached


# --- whole replies ------------------------------------------------------------------------------


def test_reply_of_a_known_dialect() -> None:
    assert reply_tokens({"usage": CHAT_USAGE}, "openai") == (120, 45)
    assert reply_tokens({"usage": MESSAGE_USAGE}, "anthropic") == (20, 8)
    # the dialect is the caller's word: the other dialect's keys are not read
    assert reply_tokens({"usage": MESSAGE_USAGE}, "openai") == (0, 0)
    assert reply_tokens({"usage": CHAT_USAGE}, "anthropic") == (0, 0)


def test_reply_read_by_its_keys() -> None:
    assert reply_tokens({"usage": CHAT_USAGE}) == (120, 45)
    assert reply_tokens({"usage": {"prompt_tokens": 8, "total_tokens": 8}}) == (8, 0)
    assert reply_tokens({"usage": MESSAGE_USAGE}) == (20, 8)
    assert reply_tokens({"usage": {}}) == (0, 0)


@pytest.mark.parametrize("usage", [None, "12", [1, 2], 7])
@pytest.mark.parametrize("dialect", ["openai", "anthropic", None])
def test_reply_without_a_usage_object(usage: Any, dialect: Any) -> None:
    """Not reported is not zero: the relay then leaves ``ctx.usage`` unreported."""
    assert reply_tokens({"usage": usage}, dialect) is None
    assert reply_tokens({"id": "x"}, dialect) is None


# --- Anthropic stream events --------------------------------------------------------------------


def read(kind: str | None, data: dict[str, Any], seen: Tokens) -> Tokens | None:
    """The counts after one event, from those ``seen``; None (and untouched) if no usage."""
    counts = Usage(input_tokens=seen[0], output_tokens=seen[1])
    if not read_anthropic_event(kind, data, counts):
        assert (counts.input_tokens, counts.output_tokens) == seen
        return None
    return counts.input_tokens, counts.output_tokens


def start(usage: Any) -> dict[str, Any]:
    message = {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "usage": usage}
    return {"type": "message_start", "message": message}


def delta(usage: Any) -> dict[str, Any]:
    return {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage}


START = start(
    {
        "input_tokens": 20,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 5,
        "output_tokens": 1,  # a placeholder: the real count comes in message_delta
    }
)


def test_message_start_counts_input_and_a_placeholder_output() -> None:
    assert read("message_start", START, (0, 0)) == (25, 1)


def test_message_delta_closes_the_output_and_keeps_the_input() -> None:
    seen = read("message_start", START, (0, 0))
    assert seen is not None
    assert read("message_delta", delta({"output_tokens": 42}), seen) == (25, 42)


def test_message_delta_recounts_input() -> None:
    """Server tools make message_delta repeat the cumulative input counts: they replace."""
    usage = {"input_tokens": 40, "cache_read_input_tokens": 5, "output_tokens": 9}
    assert read("message_delta", delta(usage), (25, 1)) == (45, 9)


@pytest.mark.parametrize(
    ("usage", "tokens"),
    [
        ({"output_tokens": None}, (25, 1)),  # null: not reported, the figure seen stands
        ({}, (25, 1)),
        ({"input_tokens": None, "cache_read_input_tokens": 9, "output_tokens": 3}, (25, 3)),
        ({"output_tokens": 0}, (25, 0)),  # a reported 0 is a count
        ({"input_tokens": 0, "output_tokens": 3}, (0, 3)),
    ],
)
def test_message_delta_reads_only_what_it_reports(usage: dict[str, Any], tokens: Tokens) -> None:
    assert read("message_delta", delta(usage), (25, 1)) == tokens


def test_message_start_without_counts() -> None:
    assert read("message_start", start({}), (0, 0)) == (0, 0)
    counts = {"input_tokens": None, "output_tokens": None}
    assert read("message_start", start(counts), (0, 0)) == (0, 0)


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        ("message_start", start(None)),
        ("message_start", {"type": "message_start", "message": {}}),
        ("message_start", {"type": "message_start"}),
        ("message_delta", delta(None)),
        ("message_delta", {"type": "message_delta", "delta": {}}),
        ("message_delta", delta("12")),
        ("ping", {"type": "ping"}),
        ("content_block_delta", {"type": "content_block_delta", "usage": {"output_tokens": 5}}),
        ("message_stop", {"type": "message_stop"}),
        (None, delta({"output_tokens": 5})),
    ],
)
def test_events_without_usage(kind: str | None, data: dict[str, Any]) -> None:
    assert read(kind, data, (3, 4)) is None


def test_malformed_counts_raise() -> None:
    """The relay ends such a stream as malformed; it must not be metered as zero."""
    with pytest.raises(ValueError):
        read("message_delta", delta({"output_tokens": "many"}), (0, 0))
    with pytest.raises(AttributeError):
        read("message_start", {"message": "not an object"}, (0, 0))


def test_the_translator_counts_as_the_reader() -> None:
    """An OpenAI client of a Claude model is metered from the translator's counts, an Anthropic
    client from the reader's: the same events give the same figures."""
    events = [
        ("message_start", START),
        ("ping", {"type": "ping"}),
        ("message_delta", delta({"output_tokens": 42})),
        ("message_stop", {"type": "message_stop"}),
    ]
    translator = MessagesStreamToChat("m", include_usage=True)
    seen: Tokens = (0, 0)
    for kind, data in events:
        translator.feed(kind, data)
        seen = read(kind, data, seen) or seen
        assert translator.usage == seen
    assert seen == (25, 42)


# --- OpenAI stream chunks -----------------------------------------------------------------------


def chunk(**fields: Any) -> bytes:
    base = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-x",
        "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}],
    }
    return orjson.dumps({**base, **fields})


def test_usage_chunk() -> None:
    assert openai_chunk_tokens(chunk(choices=[], usage=CHAT_USAGE)) == (120, 45)
    spaced = b'{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}'
    assert openai_chunk_tokens(spaced) == (3, 2)


@pytest.mark.parametrize(
    "data",
    [
        chunk(),  # include_usage not asked for: no usage key
        chunk(usage=None),  # asked for: "usage": null on every chunk but the last
        b'{"choices": [], "usage": null}',
        b'{"choices": [], "usage" :  null}',
        # a "usage" inside a text is escaped in JSON: no parse, no count
        chunk(
            choices=[{"index": 0, "delta": {"content": '"usage": {"prompt_tokens": 9}'}}],
            usage=None,
        ),
        chunk(usage="12"),
        b'{"usage": {"prompt_tokens": 3',  # cut: forwarded as is, counted by nobody
        b'["usage", 1]',
    ],
)
def test_chunks_without_usage(data: bytes) -> None:
    assert openai_chunk_tokens(data) is None
