"""Usage read from a whole reply without parsing it must equal the parsed reading."""

from __future__ import annotations

import orjson
import pytest

from proxy.relay import sniff_usage, usage_from_body

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


@pytest.mark.parametrize(("kind", "body"), [("openai", OPENAI), ("anthropic", ANTHROPIC)])
@pytest.mark.parametrize("indent", [False, True])
def test_sniffed_usage_matches_parsed(kind: str, body: dict[str, object], indent: bool) -> None:
    raw = orjson.dumps(body, option=orjson.OPT_INDENT_2 if indent else 0)
    assert sniff_usage(kind, raw) == usage_from_body(kind, body)
    assert sniff_usage(kind, raw) == ((12, 7) if kind == "openai" else (20, 8))


def test_no_usage() -> None:
    assert sniff_usage("openai", b'{"id": "x", "choices": []}') is None
