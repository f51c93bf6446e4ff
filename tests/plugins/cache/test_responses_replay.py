"""The cache's canonical form of a Responses reply: a stored Response replayed as a stream
must fold back, in the openai SDK's own stream state, into that same Response."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from plugins.cache.replay import Assembler, replay
from plugins.cache.responses_replay import PIECE_CHARS
from proxy import sse
from proxy.tokens import reply_tokens

LONG = "Héllo wörld — 你好世界! 🎉 naïve café " * 8
ARGS = orjson.dumps({"city": "Zürich", "notes": "東京 " * 30}).decode()
USAGE = {
    "input_tokens": 12,
    "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
    "output_tokens": 40,
    "output_tokens_details": {"reasoning_tokens": 7},
    "total_tokens": 52,
}
_EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def response(*output: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    return {
        "id": "resp_abc",
        "object": "response",
        "created_at": 1_760_000_000,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": None,
        "max_output_tokens": None,
        "model": "gpt-5.4-mini",
        "output": list(output),
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": USAGE,
        "metadata": {},
    }


def message(*parts: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": list(parts),
    }


TEXT = {"type": "output_text", "text": LONG, "annotations": [], "logprobs": []}
CASES = {
    "text": response(message(TEXT)),
    "empty text": response(message({**TEXT, "text": ""})),
    "refusal": response(message({"type": "refusal", "refusal": "I can't help with that."})),
    "call": response(
        {
            "id": "fc_1",
            "type": "function_call",
            "status": "completed",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": ARGS,
        }
    ),
    "search then text": response(
        {
            "id": "ws_1",
            "type": "web_search_call",
            "status": "completed",
            "action": {"type": "search", "query": "news"},
        },
        message(TEXT),
    ),
    "incomplete": response(message(TEXT, status="incomplete"), status="incomplete"),
}


def sdk_final(frames: list[bytes]) -> Any:
    """What ``client.responses.stream(...)`` makes of the frames: ``get_final_response()``'s
    Response, or for an incomplete one (which it has no final response for) the Response of
    the closing ``response.incomplete`` event it hands out."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    fired: list[Any] = []
    for raw in frames:
        name, data = sse.parse_event(raw.rstrip(b"\n"))
        event = _EVENT.validate_python(orjson.loads(data))
        assert event.type == name
        fired.extend(state.handle_event(event))
    if fired[-1].type == "response.incomplete":
        return fired[-1].response
    return state._completed_response


@pytest.mark.parametrize("case", CASES)
def test_sdk_folds_the_replay_into_the_body(case: str) -> None:
    body = copy.deepcopy(CASES[case])
    frames = replay("responses", body, include_usage=False)
    assert body == CASES[case]  # the stored body is not touched
    final = sdk_final(frames)
    assert final is not None
    assert final.model_dump(mode="json", exclude_none=True) == Response.model_validate(
        body
    ).model_dump(mode="json", exclude_none=True)
    numbers = [orjson.loads(sse.parse_event(f.rstrip(b"\n"))[1])["sequence_number"] for f in frames]
    assert numbers == list(range(len(frames)))


@pytest.mark.parametrize("case", CASES)
def test_assembler_round_trip(case: str) -> None:
    body = CASES[case]
    asm = Assembler("responses")
    for raw in replay("responses", body, include_usage=True):
        name, data = sse.parse_event(raw.rstrip(b"\n"))
        asm.feed(name, orjson.loads(data))
    assert asm.result() == body
    assert reply_tokens(body) == (12, 40)  # a stored Response's usage read without a dialect


def test_text_streams_in_pieces() -> None:
    frames = replay("responses", CASES["text"], include_usage=False)
    deltas = [f for f in frames if f.startswith(b"event: response.output_text.delta")]
    assert len(deltas) == -(-len(LONG) // PIECE_CHARS)


def test_failed_or_unfinished_streams_are_not_cached() -> None:
    frames = replay("responses", CASES["text"], include_usage=False)
    for cut in (
        frames[:-1],
        [*frames[:-1], sse.frame_json({"type": "error", "message": "x"}, "error")],
    ):
        asm = Assembler("responses")
        for raw in cut:
            name, data = sse.parse_event(raw.rstrip(b"\n"))
            asm.feed(name, orjson.loads(data))
        assert asm.result() is None
    failed = Assembler("responses")
    failed.feed("response.failed", {"type": "response.failed", "response": {"status": "failed"}})
    assert failed.result() is None
