"""Usage read from a whole provider reply: both dialects, cache tokens counted as input."""

from __future__ import annotations

import pytest

from proxy.relay import usage_from_body

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
    kind: str, body: dict[str, object], tokens: tuple[int, int]
) -> None:
    assert usage_from_body(kind, body) == tokens


def test_no_usage() -> None:
    assert usage_from_body("openai", {"id": "x", "choices": []}) is None
    assert usage_from_body("anthropic", {"id": "m", "usage": "not an object"}) is None
