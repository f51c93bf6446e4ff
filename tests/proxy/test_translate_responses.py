"""Tests for proxy.translate's Responses API <-> Chat Completions translation.

Every Response object is validated with the OpenAI SDK's own model and every stream event with
its event union; the SDK's client helpers (``responses.create``, ``responses.stream``,
``responses.parse`` with a pydantic ``text_format``) are driven over an in-memory transport that
serves what the translators produced, so "the SDK accepts it" is tested, not assumed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import httpx2
import openai
import orjson
import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from proxy.translate import (
    ChatStreamToResponses,
    MessagesStreamToChat,
    chat_response_to_responses,
    chat_to_messages_request,
    responses_input_items,
    responses_to_chat_request,
)

EVENT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(ResponseStreamEvent)
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
PNG = "data:image/png;base64,iVBORw0KGgo="
PDF = "data:application/pdf;base64,JVBERi0xLjQK"
RID = "resp_0123abcd"


# --- helpers -----------------------------------------------------------------------------------


def chat_reply(
    content: str | None = "Hello there.",
    tool_calls: list[dict[str, Any]] | None = None,
    finish: str = "stop",
    **message: Any,
) -> dict[str, Any]:
    """A chat.completion as OpenAI sends it."""
    msg: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None, **message}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-x",
        "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": 30,
            "completion_tokens": 12,
            "total_tokens": 42,
            "prompt_tokens_details": {"cached_tokens": 8},
            "completion_tokens_details": {"reasoning_tokens": 4},
        },
    }


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def chunk(delta: dict[str, Any], finish: str | None = None, **choice: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-x",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **choice}],
        "usage": None,
    }


def usage_chunk() -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-x",
        "choices": [],
        "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42},
    }


def text_then_tools_then_text() -> list[dict[str, Any]]:
    """Text, two tool calls (the second's arguments in pieces), text again, then usage."""
    return [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Checking "}),
        chunk({"content": "both."}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                    }
                ]
            }
        ),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "weather", "arguments": ""},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": '"Rome"}'}}]}),
        chunk({"content": "Done."}),
        chunk({}, "tool_calls"),
        usage_chunk(),
    ]


def run_stream(
    chunks: list[dict[str, Any]], request: dict[str, Any] | None = None
) -> tuple[ChatStreamToResponses, list[tuple[str, dict[str, Any]]]]:
    translator = ChatStreamToResponses(request or {"model": "gpt-alias"}, RID, "gpt-alias", 17)
    events = [event for c in chunks for event in translator.feed(c)]
    return translator, events + translator.finish()


def validated(events: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """Every event through the SDK's union (a wrong field fails here), numbered from 0."""
    out = []
    for n, (name, data) in enumerate(events):
        assert name == data["type"]
        assert data["sequence_number"] == n
        out.append(EVENT.validate_python(data))
    return out


def sse_body(events: list[tuple[str, dict[str, Any]]]) -> bytes:
    """Events framed as the gateway sends them."""
    out = bytearray()
    for name, data in events:
        out += b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
    return bytes(out)


Handler = Callable[[dict[str, Any]], tuple[str, bytes]]


def sdk_client(handle: Handler) -> openai.OpenAI:
    """An OpenAI client whose transport hands each request body to ``handle``, which answers
    with (content type, body): the translators' output, as the gateway would send it."""

    def transport(request: httpx2.Request) -> httpx2.Response:
        content_type, body = handle(orjson.loads(request.content))
        return httpx2.Response(200, headers={"content-type": content_type}, content=body)

    http = httpx2.Client(transport=httpx2.MockTransport(transport))
    return openai.OpenAI(api_key="k", base_url="http://gateway/v1", http_client=http)


# --- input items -------------------------------------------------------------------------------


def test_a_string_input_is_one_user_message_after_the_instructions() -> None:
    body = {"model": "m", "input": "Hi there", "instructions": "Be brief."}
    assert responses_input_items(body) == [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi there"}]}
    ]
    assert responses_to_chat_request(body, "up")["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]


def test_short_messages_are_normalised_and_other_items_kept_as_they_are() -> None:
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    body = {
        "input": [
            {"role": "user", "content": "a"},
            {"type": "message", "role": "assistant", "content": "b"},
            call,
        ]
    }
    items = responses_input_items(body)
    assert items[0] == {
        "role": "user",
        "type": "message",
        "content": [{"type": "input_text", "text": "a"}],
    }
    assert items[1]["content"] == [{"type": "output_text", "text": "b", "annotations": []}]
    assert items[2] is call
    assert body["input"][0] == {"role": "user", "content": "a"}  # not modified
    assert responses_input_items({"model": "m"}) == []


def test_message_parts_of_every_kind_and_every_role() -> None:
    body = {
        "model": "m",
        "input": [
            {"role": "developer", "content": "Answer in French."},
            {"role": "system", "content": [{"type": "input_text", "text": "No jokes."}]},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Compare these."},
                    {"type": "input_image", "image_url": "https://x.test/a.png", "detail": "low"},
                    {"type": "input_image", "image_url": PNG, "detail": "auto"},
                    {"type": "input_file", "file_data": PDF, "filename": "r.pdf"},
                    {"type": "input_file", "file_id": "file-1"},
                ],
            },
            {"role": "assistant", "content": [{"type": "output_text", "text": "Sure."}]},
        ],
    }
    messages = responses_to_chat_request(body, "up")["messages"]
    assert messages[:2] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "system", "content": "No jokes."},
    ]
    assert messages[2] == {
        "role": "user",
        "content": [
            {"type": "text", "text": "Compare these."},
            {"type": "image_url", "image_url": {"url": "https://x.test/a.png", "detail": "low"}},
            {"type": "image_url", "image_url": {"url": PNG, "detail": "auto"}},
            {"type": "file", "file": {"file_data": PDF, "filename": "r.pdf"}},
            {"type": "file", "file": {"file_id": "file-1"}},
        ],
    }
    assert messages[3] == {"role": "assistant", "content": "Sure."}


def test_an_earlier_response_fed_back_becomes_the_assistant_and_tool_turns() -> None:
    """The output items of a Response (as the SDK serialises them) plus the tool results and
    a reasoning item: chat gets one assistant turn with text and both calls, the tool turns,
    the tool's image in a user turn after them, then the next question. Through the Anthropic
    translation too, so a Claude model gets alternating turns with tool_use/tool_result."""
    earlier = Response.model_validate(
        chat_response_to_responses(
            chat_reply(
                "Let me look.",
                [
                    tool_call("call_a", "weather", '{"city":"Paris"}'),
                    tool_call("call_b", "map", "{}"),
                ],
                "tool_calls",
            ),
            {"model": "gpt-alias"},
            RID,
            "gpt-alias",
            17,
        )
    )
    history = [o.model_dump(exclude_none=True) for o in earlier.output]
    body = {
        "model": "gpt-alias",
        "input": [
            {"role": "user", "content": "Weather and map of Paris?"},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},
            *history,
            {"type": "function_call_output", "call_id": "call_a", "output": "18C, sunny"},
            {
                "type": "function_call_output",
                "call_id": "call_b",
                "output": [
                    {"type": "input_text", "text": "map attached"},
                    {"type": "input_image", "image_url": PNG},
                ],
            },
            {"role": "user", "content": "Thanks. Tomorrow?"},
        ],
    }
    messages = responses_to_chat_request(body, "up")["messages"]
    assert messages == [
        {"role": "user", "content": "Weather and map of Paris?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                tool_call("call_a", "weather", '{"city":"Paris"}'),
                tool_call("call_b", "map", "{}"),
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "18C, sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "map attached"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG}}]},
        {"role": "user", "content": "Thanks. Tomorrow?"},
    ]
    claude = chat_to_messages_request(responses_to_chat_request(body, "up"), "claude-x")
    assert [m["role"] for m in claude["messages"]] == ["user", "assistant", "user"]
    assert [b["type"] for b in claude["messages"][1]["content"]] == ["text", "tool_use", "tool_use"]
    assert [b["type"] for b in claude["messages"][2]["content"]] == [
        "tool_result",
        "tool_result",
        "image",
        "text",
    ]


def test_calls_without_text_and_a_refusal_in_history() -> None:
    body = {
        "input": [
            {"role": "user", "content": "x"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a":1}'},
            {"type": "function_call_output", "call_id": "c1", "output": "ok"},
            {
                "type": "message",
                "role": "assistant",
                "id": "msg_1",
                "status": "completed",
                "content": [{"type": "refusal", "refusal": "I can't."}],
            },
        ]
    }
    messages = responses_to_chat_request(body, "up")["messages"]
    assert messages[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [tool_call("c1", "f", '{"a":1}')],
    }
    assert messages[3] == {
        "role": "assistant",
        "content": [{"type": "refusal", "refusal": "I can't."}],
    }


# --- tools, formats and parameters -------------------------------------------------------------


def test_function_tools_become_nested_and_choices_map() -> None:
    body = {
        "model": "m",
        "input": "Weather?",
        "tools": [
            {
                "type": "function",
                "name": "weather",
                "description": "Current weather",
                "parameters": WEATHER,
                "strict": True,
            },
            {"type": "function", "name": "noop"},
        ],
        "tool_choice": {"type": "function", "name": "weather"},
        "parallel_tool_calls": False,
    }
    out = responses_to_chat_request(body, "up")
    assert out["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "Current weather",
                "parameters": WEATHER,
                "strict": True,
            },
        },
        {
            "type": "function",
            "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}},
        },
    ]
    assert out["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert out["parallel_tool_calls"] is False
    for choice in ("auto", "none", "required"):
        assert (
            responses_to_chat_request({**body, "tool_choice": choice}, "up")["tool_choice"]
            == choice
        )
    without = responses_to_chat_request({"input": "x", "parallel_tool_calls": True}, "up")
    assert "parallel_tool_calls" not in without and "tools" not in without


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "web_search"},
        {"type": "web_search_preview"},
        {"type": "file_search", "vector_store_ids": ["vs_1"]},
        {"type": "computer_use_preview", "display_width": 1, "display_height": 1},
        {"type": "code_interpreter", "container": {"type": "auto"}},
        {"type": "image_generation"},
        {"type": "mcp", "server_label": "x", "server_url": "https://x.test"},
        {"type": "custom", "name": "grammar"},
        {"type": "local_shell"},
    ],
)
def test_hosted_tools_are_refused_by_their_index(tool: dict[str, Any]) -> None:
    body = {"input": "x", "tools": [{"type": "function", "name": "f"}, tool]}
    with pytest.raises(ValueError, match=r"^tools\[1\]\.type: the '" + tool["type"]):
        responses_to_chat_request(body, "up")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            {"format": {"type": "json_schema", "name": "w", "schema": WEATHER, "strict": True}},
            {
                "type": "json_schema",
                "json_schema": {"name": "w", "schema": WEATHER, "strict": True},
            },
        ),
        ({"format": {"type": "json_object"}}, {"type": "json_object"}),
        ({"format": {"type": "text"}}, None),
        ({}, None),
    ],
)
def test_text_format_becomes_response_format(
    text: dict[str, Any], expected: dict[str, Any] | None
) -> None:
    out = responses_to_chat_request({"input": "x", "text": text}, "up")
    assert out.get("response_format") == expected


def test_parameters_map_and_gateway_side_fields_stay_behind() -> None:
    body = {
        "model": "gpt-alias",
        "input": "x",
        "reasoning": {"effort": "low", "summary": "auto"},
        "text": {"verbosity": "low"},
        "max_output_tokens": 300,
        "temperature": 0.2,
        "top_p": 0.9,
        "safety_identifier": "user-hash",
        "service_tier": "flex",
        "metadata": {"k": "v"},
        "store": False,
        "previous_response_id": "resp_prev",
        "truncation": "auto",
        "include": ["reasoning.encrypted_content", "message.input_image.image_url"],
        "prompt_cache_key": "p",
        "max_tool_calls": 3,
        "background": False,
        "stream": True,
        "stream_options": {"include_obfuscation": False},
    }
    assert responses_to_chat_request(body, "upstream-model") == {
        "model": "upstream-model",
        "messages": [{"role": "user", "content": "x"}],
        "verbosity": "low",
        "reasoning_effort": "low",
        "max_completion_tokens": 300,
        "temperature": 0.2,
        "top_p": 0.9,
        "service_tier": "flex",
        "safety_identifier": "user-hash",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    logprobs = {"input": "x", "include": ["message.output_text.logprobs"], "top_logprobs": 2}
    out = responses_to_chat_request(logprobs, "up")
    assert out["logprobs"] is True and out["top_logprobs"] == 2
    both = responses_to_chat_request({"input": "x", "user": "u", "safety_identifier": "s"}, "up")
    assert (both["user"], both["safety_identifier"]) == ("u", "s")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"moderation": {"mode": "on"}}, "moderation"),
        ({"n": 2}, "n"),
        ({"include": ["message.output_text.everything"]}, r"include\[0\]"),
        ({"include": "reasoning.encrypted_content"}, "include"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "name": "f"}],
                "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []},
            },
            "tool_choice",
        ),
        (
            {"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "web_search"}},
            "tool_choice",
        ),
        ({"tools": [{"type": "function"}]}, r"tools\[0\]\.name"),
        ({"tools": "f"}, "tools"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
        ({"text": {"format": {"type": "grammar"}}}, r"text\.format\.type"),
        ({"instructions": ["not", "text"]}, "instructions"),
        ({"input": 7}, "input"),
        ({"input": ["hi"]}, r"input\[0\]"),
        ({"input": [{"content": "no role"}]}, r"input\[0\]\.type"),
        ({"input": [{"role": "tool", "content": "x"}]}, r"input\[0\]\.role"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, r"input\[0\]\.type"),
        ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, r"input\[0\]\.type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            r"input\[0\]\.content\[0\]\.file_id",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_url": "u"}]}]},
            r"input\[0\]\.content\[0\]\.file_url",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_video"}]}]},
            r"input\[0\]\.content\[0\]\.type",
        ),
        (
            {
                "input": [
                    {"role": "developer", "content": [{"type": "input_image", "image_url": PNG}]}
                ]
            },
            r"input\[0\]\.content\[0\]\.type",
        ),
        ({"input": [{"role": "user", "content": 5}]}, r"input\[0\]\.content"),
        (
            {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            r"input\[0\]\.call_id",
        ),
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]},
            r"input\[0\]\.arguments",
        ),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, r"input\[0\]\.call_id"),
    ],
)
def test_what_cannot_be_honoured_is_refused_naming_the_field(
    body: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        responses_to_chat_request({"model": "m", **body}, "up")


def test_the_request_is_left_as_it_was() -> None:
    body = {
        "model": "m",
        "instructions": "i",
        "input": [
            {"role": "user", "content": "a"},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            {
                "type": "function_call_output",
                "call_id": "c",
                "output": [{"type": "input_text", "text": "t"}],
            },
        ],
        "tools": [{"type": "function", "name": "f", "parameters": WEATHER}],
        "text": {"format": {"type": "json_schema", "name": "w", "schema": WEATHER}},
    }
    before = copy.deepcopy(body)
    responses_to_chat_request(body, "up")
    assert body == before


# --- whole responses ---------------------------------------------------------------------------


def test_a_chat_reply_becomes_a_response_echoing_the_request() -> None:
    request = {
        "model": "gpt-alias",
        "input": "Hi",
        "instructions": "Be brief.",
        "tools": [{"type": "function", "name": "f", "parameters": WEATHER, "strict": True}],
        "tool_choice": "auto",
        "temperature": 0.3,
        "top_p": 0.8,
        "max_output_tokens": 99,
        "text": {"format": {"type": "json_object"}},
        "reasoning": {"effort": "low"},
        "parallel_tool_calls": False,
        "previous_response_id": "resp_prev",
        "store": False,
        "metadata": {"team": "a"},
    }
    raw = chat_response_to_responses(chat_reply(), request, RID, "gpt-alias", 1700000001)
    response = Response.model_validate(raw)
    assert response.id == RID and response.object == "response" and response.model == "gpt-alias"
    assert response.created_at == 1700000001 and response.status == "completed"
    assert response.output_text == "Hello there."
    message = raw["output"][0]
    assert message == {
        "id": "msg_0123abcd",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [
            {"type": "output_text", "text": "Hello there.", "annotations": [], "logprobs": []}
        ],
    }
    assert raw["usage"] == {
        "input_tokens": 30,
        "input_tokens_details": {"cached_tokens": 8, "cache_write_tokens": 0},
        "output_tokens": 12,
        "output_tokens_details": {"reasoning_tokens": 4},
        "total_tokens": 42,
    }
    assert response.instructions == "Be brief."
    assert response.tools[0].type == "function" and response.tools[0].name == "f"
    assert response.tools[0].parameters == WEATHER and response.tools[0].strict is True
    assert (response.temperature, response.top_p, response.max_output_tokens) == (0.3, 0.8, 99)
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_object"
    assert response.reasoning is not None and response.reasoning.effort == "low"
    assert response.parallel_tool_calls is False and response.tool_choice == "auto"
    assert response.previous_response_id == "resp_prev"
    assert raw["store"] is False and response.metadata == {"team": "a"}


def test_defaults_are_echoed_as_openai_does() -> None:
    raw = chat_response_to_responses(chat_reply(), {"model": "m", "input": "x"}, RID, "m", 1)
    Response.model_validate(raw)
    assert raw["tool_choice"] == "auto" and raw["tools"] == []
    assert (raw["temperature"], raw["top_p"], raw["parallel_tool_calls"]) == (1.0, 1.0, True)
    assert raw["store"] is True and raw["metadata"] == {} and raw["truncation"] == "disabled"
    assert raw["text"] == {"format": {"type": "text"}, "verbosity": "medium"}
    assert raw["error"] is None and raw["incomplete_details"] is None


def test_tool_calls_become_function_call_items_after_the_text() -> None:
    calls = [tool_call("call_a", "weather", '{"city":"Paris"}'), tool_call("call_b", "map", "{}")]
    raw = chat_response_to_responses(
        chat_reply("Checking.", calls, "tool_calls"), {"model": "m"}, RID, "m", 1
    )
    response = Response.model_validate(raw)
    assert [o.type for o in response.output] == ["message", "function_call", "function_call"]
    assert raw["output"][1] == {
        "id": "fc_0123abcd_0",
        "type": "function_call",
        "status": "completed",
        "call_id": "call_a",
        "name": "weather",
        "arguments": '{"city":"Paris"}',
    }
    assert raw["output"][2]["id"] == "fc_0123abcd_1" and raw["output"][2]["call_id"] == "call_b"
    only_calls = chat_response_to_responses(chat_reply(None, calls, "tool_calls"), {}, RID, "m", 1)
    assert [o["type"] for o in only_calls["output"]] == ["function_call", "function_call"]


@pytest.mark.parametrize(
    ("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")]
)
def test_a_cut_reply_is_incomplete(finish: str, reason: str) -> None:
    raw = chat_response_to_responses(chat_reply("Once upon", finish=finish), {}, RID, "m", 1)
    response = Response.model_validate(raw)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == reason
    assert raw["output"][0]["status"] == "incomplete"
    assert "completed_at" not in raw


def test_a_refusal_is_a_refusal_part() -> None:
    raw = chat_response_to_responses(chat_reply(None, refusal="I can't help."), {}, RID, "m", 1)
    response = Response.model_validate(raw)
    assert raw["output"][0]["content"] == [{"type": "refusal", "refusal": "I can't help."}]
    assert response.output_text == ""


def test_logprobs_and_url_citations_carry_over() -> None:
    chat = chat_reply(
        "Hi",
        annotations=[
            {
                "type": "url_citation",
                "url_citation": {
                    "start_index": 0,
                    "end_index": 2,
                    "url": "https://x.test",
                    "title": "X",
                },
            }
        ],
    )
    chat["choices"][0]["logprobs"] = {
        "content": [
            {
                "token": "Hi",
                "logprob": -0.1,
                "bytes": [72, 105],
                "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": None}],
            }
        ]
    }
    raw = chat_response_to_responses(chat, {}, RID, "m", 1)
    Response.model_validate(raw)
    part = raw["output"][0]["content"][0]
    assert part["annotations"] == [
        {
            "type": "url_citation",
            "start_index": 0,
            "end_index": 2,
            "url": "https://x.test",
            "title": "X",
        }
    ]
    assert part["logprobs"] == [
        {
            "token": "Hi",
            "logprob": -0.1,
            "bytes": [72, 105],
            "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]}],
        }
    ]


# --- streams -----------------------------------------------------------------------------------


def test_a_text_stream_is_the_full_typed_sequence() -> None:
    chunks = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo."}),
        chunk({}, "stop"),
        usage_chunk(),
    ]
    translator, events = run_stream(chunks)
    validated(events)
    assert [name for name, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    created = events[0][1]["response"]
    assert (
        created["status"] == "in_progress" and created["output"] == [] and created["usage"] is None
    )
    where = {"item_id": "msg_0123abcd", "output_index": 0, "content_index": 0}
    assert events[2][1]["item"] == {
        "id": "msg_0123abcd",
        "type": "message",
        "status": "in_progress",
        "role": "assistant",
        "content": [],
    }
    assert events[4][1] == {
        **where,
        "delta": "Hel",
        "logprobs": [],
        "type": "response.output_text.delta",
        "sequence_number": 4,
    }
    assert events[6][1]["text"] == "Hello."
    assert events[8][1]["item"]["status"] == "completed"
    final = Response.model_validate(events[-1][1]["response"])
    assert final.status == "completed" and final.output_text == "Hello."
    assert final.usage is not None and (final.usage.input_tokens, final.usage.output_tokens) == (
        30,
        12,
    )
    assert translator.usage == (30, 12)
    assert translator.response is events[-1][1]["response"]


def test_text_and_tool_calls_interleaved_are_separate_items_in_order() -> None:
    translator, events = run_stream(text_then_tools_then_text())
    parsed = validated(events)
    added = [
        (e.output_index, e.item.type) for e in parsed if e.type == "response.output_item.added"
    ]
    done = [(e.output_index, e.item.type) for e in parsed if e.type == "response.output_item.done"]
    assert (
        added
        == done
        == [(0, "message"), (1, "function_call"), (2, "function_call"), (3, "message")]
    )
    # one item at a time: each item is done before the next one is added
    kinds = [e.type for e in parsed if e.type.startswith("response.output_item")]
    assert kinds == ["response.output_item.added", "response.output_item.done"] * 4
    deltas = [e for e in parsed if e.type == "response.function_call_arguments.delta"]
    assert [(d.output_index, d.item_id, d.delta) for d in deltas] == [
        (1, "fc_0123abcd_0", '{"city":"Paris"}'),
        (2, "fc_0123abcd_1", '{"city":'),
        (2, "fc_0123abcd_1", '"Rome"}'),
    ]
    args_done = [e for e in parsed if e.type == "response.function_call_arguments.done"]
    assert [(d.output_index, d.arguments) for d in args_done] == [
        (1, '{"city":"Paris"}'),
        (2, '{"city":"Rome"}'),
    ]
    final = Response.model_validate(translator.response)
    assert final.status == "completed"
    assert [o.id for o in final.output] == [
        "msg_0123abcd",
        "fc_0123abcd_0",
        "fc_0123abcd_1",
        "msg_0123abcd_1",
    ]
    assert final.output_text == "Checking both.Done."
    calls = [o for o in final.output if o.type == "function_call"]
    assert [(c.call_id, c.name, c.arguments) for c in calls] == [
        ("call_a", "weather", '{"city":"Paris"}'),
        ("call_b", "weather", '{"city":"Rome"}'),
    ]
    text_deltas = [e for e in parsed if e.type == "response.output_text.delta"]
    assert [(d.output_index, d.delta) for d in text_deltas] == [
        (0, "Checking "),
        (0, "both."),
        (3, "Done."),
    ]


def test_a_stream_cut_by_the_token_limit_is_incomplete() -> None:
    translator, events = run_stream([chunk({"content": "Once upon"}), chunk({}, "length")])
    validated(events)
    assert events[-1][0] == "response.incomplete"
    final = Response.model_validate(events[-1][1]["response"])
    assert final.status == "incomplete"
    assert final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"
    assert events[-2][1]["item"]["status"] == "incomplete"
    assert translator.usage is None and final.usage is None  # the stream reported none


def test_a_streamed_refusal_and_logprobs() -> None:
    lp = {"content": [{"token": "No", "logprob": -0.5, "bytes": [78, 111], "top_logprobs": []}]}
    chunks = [
        chunk({"content": "No"}, logprobs=lp),
        chunk({"refusal": "I can't "}),
        chunk({"refusal": "do that."}),
        chunk({}, "stop"),
    ]
    _, events = run_stream(chunks)
    validated(events)
    names = [name for name, _ in events]
    assert names[2:] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.content_part.added",
        "response.refusal.delta",
        "response.refusal.delta",
        "response.refusal.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[4][1]["logprobs"][0]["token"] == "No"
    assert events[7][1]["content_index"] == 1 and events[10][1]["refusal"] == "I can't do that."
    final = Response.model_validate(events[-1][1]["response"])
    assert [p.type for p in final.output[0].content] == ["output_text", "refusal"]  # type: ignore[union-attr]


def test_an_empty_stream_still_completes() -> None:
    translator, events = run_stream([])
    validated(events)
    assert [name for name, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.completed",
    ]
    assert Response.model_validate(translator.response).output == []


def test_a_failed_stream_ends_with_response_failed() -> None:
    translator = ChatStreamToResponses({}, RID, "m", 1)
    events = translator.feed(chunk({"content": "Par"})) + translator.fail("upstream broke")
    parsed = validated(events)
    assert parsed[-1].type == "response.failed"
    assert parsed[-2].type == "response.output_item.done" and parsed[-2].item.status == "incomplete"
    final = Response.model_validate(translator.response)
    assert final.status == "failed" and final.error is not None
    assert (final.error.code, final.error.message) == ("server_error", "upstream broke")
    other = ChatStreamToResponses({}, RID, "m", 1)
    validated(other.fail("timed out", "upstream_timeout"))
    assert other.response is not None and other.response["error"]["code"] == "server_error"
    assert (
        validated(ChatStreamToResponses({}, RID, "m", 1).fail("slow down", "rate_limit_exceeded"))[
            -1
        ].response.error.code
        == "rate_limit_exceeded"
    )


def test_a_claude_stream_reaches_responses_through_chat() -> None:
    """Anthropic events -> chat chunks -> Responses events: the path of a Claude model."""
    anthropic_events: list[tuple[str, dict[str, Any]]] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_01",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": "claude-x",
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": 20, "output_tokens": 1},
                },
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "Hi."},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "weather",
                    "input": {},
                },
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": '{"city": "Oslo"}'},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"output_tokens": 9},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    to_chat = MessagesStreamToChat("claude-alias", include_usage=True)
    chunks = [c for name, data in anthropic_events for c in to_chat.feed(name, data)]
    translator, events = run_stream(chunks)
    validated(events)
    final = Response.model_validate(translator.response)
    assert final.output_text == "Hi."
    assert final.output[1].type == "function_call"
    assert (final.output[1].call_id, final.output[1].arguments) == ("toolu_1", '{"city": "Oslo"}')
    assert translator.usage == (20, 9)


# --- the official SDK, end to end --------------------------------------------------------------


def test_the_sdk_creates_a_response_from_a_translated_reply() -> None:
    seen: list[dict[str, Any]] = []

    def handle(body: dict[str, Any]) -> tuple[str, bytes]:
        seen.append(responses_to_chat_request(body, "upstream"))
        raw = chat_response_to_responses(chat_reply(), body, RID, body["model"], 1)
        return "application/json", orjson.dumps(raw)

    client = sdk_client(handle)
    response = client.responses.create(model="gpt-alias", input="Hi", instructions="Be brief.")
    assert response.output_text == "Hello there." and response.usage is not None
    assert response.usage.output_tokens_details.reasoning_tokens == 4
    assert seen[0]["messages"][0] == {"role": "system", "content": "Be brief."}


def test_the_sdk_stream_helper_folds_translated_events() -> None:
    requests: list[dict[str, Any]] = []

    def handle(body: dict[str, Any]) -> tuple[str, bytes]:
        requests.append(responses_to_chat_request(body, "upstream"))
        _, events = run_stream(text_then_tools_then_text(), body)
        return "text/event-stream", sse_body(events)

    client = sdk_client(handle)
    tools: Any = [{"type": "function", "name": "weather", "parameters": WEATHER, "strict": True}]
    with client.responses.stream(model="gpt-alias", input="Weather?", tools=tools) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert requests[0]["stream"] is True and requests[0]["stream_options"] == {
        "include_usage": True
    }
    assert deltas == ["Checking ", "both.", "Done."]
    assert final.output_text == "Checking both.Done."
    calls = [o for o in final.output if o.type == "function_call"]
    assert [c.parsed_arguments for c in calls] == [{"city": "Paris"}, {"city": "Rome"}]
    assert final.usage is not None and final.usage.total_tokens == 42


class Weather(pydantic.BaseModel):
    city: str
    celsius: int


def test_the_sdk_parses_a_pydantic_text_format_through_the_translation() -> None:
    """``responses.parse`` and ``responses.stream`` with ``text_format``: the SDK's strict
    schema reaches the chat provider as ``response_format`` and the JSON reply comes back
    parsed into the model."""
    formats: list[dict[str, Any]] = []
    answer = '{"city": "Oslo", "celsius": 4}'

    def handle(body: dict[str, Any]) -> tuple[str, bytes]:
        chat = responses_to_chat_request(body, "upstream")
        formats.append(chat["response_format"])
        if not body.get("stream"):
            raw = chat_response_to_responses(chat_reply(answer), body, RID, "gpt-alias", 1)
            return "application/json", orjson.dumps(raw)
        chunks = [chunk({"content": answer[:10]}), chunk({"content": answer[10:]}, "stop")]
        _, events = run_stream(chunks, body)
        return "text/event-stream", sse_body(events)

    client = sdk_client(handle)
    parsed = client.responses.parse(model="gpt-alias", input="Oslo?", text_format=Weather)
    assert parsed.output_parsed == Weather(city="Oslo", celsius=4)
    with client.responses.stream(model="gpt-alias", input="Oslo?", text_format=Weather) as stream:
        streamed = stream.get_final_response()
    assert streamed.output_parsed == Weather(city="Oslo", celsius=4)
    for fmt in formats:
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
        assert fmt["json_schema"]["schema"]["required"] == ["city", "celsius"]
