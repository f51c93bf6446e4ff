"""Tests for proxy.translate: OpenAI Chat Completions <-> Anthropic Messages.

Outputs are checked against the official SDKs' own models (and their stream accumulators), so
"the SDK parses it" is tested directly rather than assumed from hand-written expectations.
"""

from __future__ import annotations

from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pydantic
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from proxy.translate import (
    DEFAULT_MAX_TOKENS,
    ChatStreamToMessages,
    MessagesStreamToChat,
    StreamError,
    chat_finish_to_stop,
    chat_response_to_messages,
    chat_to_messages_request,
    messages_response_to_chat,
    messages_to_chat_request,
    stop_to_chat_finish,
)

EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
PNG = "iVBORw0KGgo="


# --- helpers -----------------------------------------------------------------------------------


def anthropic_stream_events(stop_reason: str = "tool_use") -> list[tuple[str, dict[str, Any]]]:
    """A realistic Anthropic stream: text block, tool_use block, usage, ping and stop."""
    return [
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
                    "usage": {
                        "input_tokens": 20,
                        "cache_read_input_tokens": 5,
                        "output_tokens": 1,
                    },
                },
            },
        ),
        ("ping", {"type": "ping"}),
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
                "delta": {"type": "text_delta", "text": "Let "},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "me check."},
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
                "delta": {"type": "input_json_delta", "partial_json": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": '{"city": "Pa'},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": 'ris"}'},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": 42},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


def openai_chunk(
    delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any
) -> dict[str, Any]:
    """One OpenAI stream chunk as the API sends it."""
    choices = (
        []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    )
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-x",
        "choices": choices,
        **extra,
    }


def openai_tool_stream() -> list[dict[str, Any]]:
    """A realistic OpenAI stream: role, text, two parallel tool calls, finish, usage-only chunk."""
    return [
        openai_chunk({"role": "assistant", "content": ""}),
        openai_chunk({"content": "Checking"}),
        openai_chunk({"content": " both."}),
        openai_chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "weather", "arguments": ""},
                    }
                ]
            }
        ),
        openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        openai_chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "time", "arguments": "{}"},
                    }
                ]
            }
        ),
        openai_chunk({}, "tool_calls"),
        openai_chunk(
            None, usage={"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}
        ),
    ]


def accumulate_anthropic(events: list[tuple[str, dict[str, Any]]]) -> Message:
    """Validate every event with the SDK's union type and fold them as messages.stream() does."""
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for name, data in events:
        assert name == data["type"]
        event = EVENT.validate_python(data)
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
    assert snapshot is not None
    return Message.model_validate(snapshot.model_dump())


def accumulate_openai(chunks: list[dict[str, Any]]) -> ChatCompletion:
    """Validate every chunk with the SDK model and fold them as chat.completions.stream() does."""
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for chunk in chunks:
        list(state.handle_chunk(ChatCompletionChunk.model_validate(chunk)))
    return ChatCompletion.model_validate(state.get_final_completion().model_dump())


def run_messages_stream(
    events: list[tuple[str, dict[str, Any]]], include_usage: bool
) -> tuple[MessagesStreamToChat, list[dict[str, Any]]]:
    translator = MessagesStreamToChat("claude-alias", include_usage)
    chunks = [chunk for name, data in events for chunk in translator.feed(name, data)]
    return translator, chunks


def run_chat_stream(
    chunks: list[dict[str, Any]],
) -> tuple[ChatStreamToMessages, list[tuple[str, dict[str, Any]]]]:
    translator = ChatStreamToMessages("gpt-alias")
    events = [event for chunk in chunks for event in translator.feed(chunk)]
    return translator, events + translator.finish()


# --- stop reasons ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
        ("model_context_window_exceeded", "length"),
        ("some_future_reason", "stop"),
        (None, None),
    ],
)
def test_stop_to_chat_finish(stop: str | None, finish: str | None) -> None:
    assert stop_to_chat_finish(stop) == finish


@pytest.mark.parametrize(
    ("finish", "stop"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("function_call", "tool_use"),
        ("content_filter", "end_turn"),
        ("weird", "end_turn"),
        (None, None),
    ],
)
def test_chat_finish_to_stop(finish: str | None, stop: str | None) -> None:
    assert chat_finish_to_stop(finish) == stop


# --- OpenAI request -> Anthropic request -------------------------------------------------------


def test_chat_request_system_defaults_and_fields_that_ask_for_nothing() -> None:
    """Fields at the value that asks for nothing (n 1, penalties 0, logprobs false, text
    format) and hints with no effect on the answer (store) are accepted and not sent."""
    body = {
        "model": "claude",
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
            {"role": "user", "content": "Hi"},
        ],
        "n": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logprobs": False,
        "store": True,
        "stream_options": {"include_usage": True},
        "response_format": {"type": "text"},
        "seed": None,
        "stream": True,
        "temperature": 1.5,
        "top_p": 0.9,
        "stop": "END",
        "user": "u-42",
    }
    out = chat_to_messages_request(body, "claude-upstream")
    assert out == {
        "model": "claude-upstream",
        "system": "Be terse.\n\nUse French.",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": DEFAULT_MAX_TOKENS,
        "temperature": 1.0,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "stream": True,
        "metadata": {"user_id": "u-42"},
    }


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, 123),
        ({"max_tokens": 50}, 50),
        ({"max_completion_tokens": 60}, 60),
        ({"max_tokens": 50, "max_completion_tokens": 60}, 60),
    ],
)
def test_chat_request_max_tokens(fields: dict[str, Any], expected: int) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], **fields}
    assert chat_to_messages_request(body, "m", default_max_tokens=123)["max_tokens"] == expected


def test_chat_request_stop_list_and_no_system() -> None:
    out = chat_to_messages_request(
        {"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b"]}, "m"
    )
    assert out["stop_sequences"] == ["a", "b"]
    assert "system" not in out
    assert "stream" not in out


def test_chat_request_tool_conversation_merges_roles() -> None:
    body = {
        "messages": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Rome"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {
                "role": "tool",
                "tool_call_id": "call_2",
                "content": [{"type": "text", "text": "25C"}],
            },
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You're welcome."},
        ]
    }
    out = chat_to_messages_request(body, "m")
    assert out["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather in Paris and Rome?"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                },
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "weather", "input": {"city": "Rome"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                {
                    "type": "tool_result",
                    "tool_use_id": "call_2",
                    "content": [{"type": "text", "text": "25C"}],
                },
                {"type": "text", "text": "Thanks"},
            ],
        },
        {"role": "assistant", "content": "You're welcome."},
    ]
    # The input body is not mutated by merging.
    assert body["messages"][0]["content"] == "Weather in Paris and Rome?"


def test_chat_request_image_url_and_bad_tool_arguments() -> None:
    body = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "https://x/cat.png"}}],
            },
            {
                "role": "assistant",
                "content": "calling",
                "tool_calls": [
                    {
                        "id": "c",
                        "type": "function",
                        "function": {"name": "f", "arguments": "not json"},
                    }
                ],
            },
        ]
    }
    out = chat_to_messages_request(body, "m")
    assert out["messages"][0]["content"] == [
        {"type": "image", "source": {"type": "url", "url": "https://x/cat.png"}}
    ]
    assert out["messages"][1]["content"] == [
        {"type": "text", "text": "calling"},
        {"type": "tool_use", "id": "c", "name": "f", "input": {}},
    ]


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        (
            {"type": "function", "function": {"name": "weather"}},
            None,
            {"type": "tool", "name": "weather"},
        ),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (None, None, None),
    ],
)
def test_chat_request_tools_and_tool_choice(
    choice: Any, parallel: Any, expected: dict[str, Any] | None
) -> None:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "x"}],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "weather",
                    "description": "Get weather",
                    "parameters": WEATHER_SCHEMA,
                },
            },
            {"type": "function", "function": {"name": "noargs"}},
        ],
    }
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    out = chat_to_messages_request(body, "m")
    assert out["tools"] == [
        {"name": "weather", "description": "Get weather", "input_schema": WEATHER_SCHEMA},
        {"name": "noargs", "description": "", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert out.get("tool_choice") == expected


def test_chat_request_without_tools_drops_tool_choice() -> None:
    out = chat_to_messages_request(
        {"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}, "m"
    )
    assert "tools" not in out
    assert "tool_choice" not in out


# --- Anthropic response -> OpenAI response -----------------------------------------------------


def anthropic_message(
    content: list[dict[str, Any]], stop_reason: str = "end_turn", **usage: int
) -> dict[str, Any]:
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-upstream",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5, **usage},
    }


def test_messages_response_to_chat_text_and_usage() -> None:
    resp = anthropic_message(
        [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "text", "text": "Hello "},
            {"type": "text", "text": "there"},
        ],
        cache_read_input_tokens=100,
        cache_creation_input_tokens=7,
    )
    out = ChatCompletion.model_validate(messages_response_to_chat(resp, "alias"))
    assert out.model == "alias"
    assert out.object == "chat.completion"
    assert out.choices[0].message.content == "Hello there"
    assert out.choices[0].message.tool_calls is None
    assert out.choices[0].finish_reason == "stop"
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        117,
        5,
        122,
    )
    assert out.usage.prompt_tokens_details is not None
    assert out.usage.prompt_tokens_details.cached_tokens == 100


def test_messages_response_to_chat_tool_use() -> None:
    resp = anthropic_message(
        [{"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}],
        "tool_use",
    )
    out = ChatCompletion.model_validate(messages_response_to_chat(resp, "alias"))
    message = out.choices[0].message
    assert message.content is None
    assert out.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls is not None
    call = message.tool_calls[0]
    assert call.id == "toolu_1"
    assert call.type == "function"
    assert call.function.name == "weather"
    assert orjson.loads(call.function.arguments) == {"city": "Paris"}


@pytest.mark.parametrize(
    ("stop", "finish"),
    [("max_tokens", "length"), ("stop_sequence", "stop"), ("refusal", "content_filter")],
)
def test_messages_response_to_chat_finish(stop: str, finish: str) -> None:
    out = ChatCompletion.model_validate(messages_response_to_chat(anthropic_message([], stop), "a"))
    assert out.choices[0].finish_reason == finish
    assert out.choices[0].message.content == ""


# --- Anthropic request -> OpenAI request -------------------------------------------------------


def test_messages_request_to_chat() -> None:
    body = {
        "model": "gpt",
        "max_tokens": 256,
        "system": [{"type": "text", "text": "Be terse."}],
        "messages": [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "weather",
                        "input": {"city": "Paris"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "18C"}],
                    },
                    {"type": "text", "text": "And this?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                    },
                ],
            },
        ],
        "stop_sequences": ["END"],
        "temperature": 0.2,
        "metadata": {"user_id": "u-1"},
        "stream": True,
        "tools": [
            {"name": "weather", "description": "Get weather", "input_schema": WEATHER_SCHEMA},
            {"type": "web_search_20250305", "name": "web_search"},
        ],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    }
    out = messages_to_chat_request(body, "gpt-upstream")
    assert out == {
        "model": "gpt-upstream",
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "And this?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                ],
            },
        ],
        "max_completion_tokens": 256,
        "temperature": 0.2,
        "stop": ["END"],
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "weather",
                    "description": "Get weather",
                    "parameters": WEATHER_SCHEMA,
                },
            }
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "user": "u-1",
        "web_search_options": {},
    }


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "none"}, "none"),
        ({"type": "any"}, "required"),
        (
            {"type": "tool", "name": "weather"},
            {"type": "function", "function": {"name": "weather"}},
        ),
    ],
)
def test_messages_request_tool_choice(choice: dict[str, Any], expected: Any) -> None:
    body = {
        "max_tokens": 1,
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"name": "weather", "input_schema": WEATHER_SCHEMA}],
        "tool_choice": choice,
    }
    out = messages_to_chat_request(body, "m")
    assert out["tool_choice"] == expected
    assert "parallel_tool_calls" not in out


def test_messages_request_non_stream_has_no_stream_options() -> None:
    out = messages_to_chat_request(
        {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "m"
    )
    assert out == {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "max_completion_tokens": 5,
    }


def test_request_round_trip_openai_anthropic_openai() -> None:
    """An OpenAI conversation survives a trip through the Anthropic shape."""
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "r"},
        {"role": "assistant", "content": "done"},
    ]
    anthropic = chat_to_messages_request({"messages": messages, "max_tokens": 9}, "claude")
    back = messages_to_chat_request(anthropic, "gpt")
    assert back["messages"] == messages
    assert back["max_completion_tokens"] == 9


# --- OpenAI response -> Anthropic response -----------------------------------------------------


def openai_completion(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-upstream",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", **message},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15},
    }


def test_chat_response_to_messages_text() -> None:
    out = Message.model_validate(
        chat_response_to_messages(openai_completion({"content": "Hi!"}), "alias")
    )
    assert out.model == "alias"
    assert out.role == "assistant"
    assert [b.model_dump(exclude_none=True) for b in out.content] == [
        {"type": "text", "text": "Hi!"}
    ]
    assert out.stop_reason == "end_turn"
    assert (out.usage.input_tokens, out.usage.output_tokens) == (11, 4)


def test_chat_response_to_messages_tool_calls() -> None:
    message = {
        "content": "Let me look.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Rome"}'},
            },
            {"id": "call_2", "type": "function", "function": {"name": "time", "arguments": ""}},
        ],
    }
    out = Message.model_validate(
        chat_response_to_messages(openai_completion(message, "tool_calls"), "alias")
    )
    assert out.stop_reason == "tool_use"
    assert out.content[0].type == "text"
    tool_a, tool_b = out.content[1], out.content[2]
    assert tool_a.type == "tool_use" and tool_b.type == "tool_use"
    assert (tool_a.id, tool_a.name, tool_a.input) == ("call_1", "weather", {"city": "Rome"})
    assert (tool_b.id, tool_b.name, tool_b.input) == ("call_2", "time", {})


@pytest.mark.parametrize(
    ("finish", "message", "stop"),
    [
        ("length", {"content": "cut"}, "max_tokens"),
        ("content_filter", {"content": None}, "end_turn"),
        # Some OpenAI-compatible servers finish with "stop" after tool calls.
        (
            "stop",
            {
                "content": None,
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            "tool_use",
        ),
    ],
)
def test_chat_response_to_messages_stop_reason(
    finish: str, message: dict[str, Any], stop: str
) -> None:
    out = Message.model_validate(chat_response_to_messages(openai_completion(message, finish), "a"))
    assert out.stop_reason == stop


def test_chat_response_refusal_becomes_text() -> None:
    out = Message.model_validate(
        chat_response_to_messages(openai_completion({"content": None, "refusal": "No."}), "a")
    )
    assert out.content[0].type == "text" and out.content[0].text == "No."


def test_response_round_trip_anthropic_openai_anthropic() -> None:
    content = [
        {"type": "text", "text": "Sure."},
        {
            "type": "tool_use",
            "id": "toolu_1",
            "name": "weather",
            "input": {"city": "Oslo", "days": [1, 2]},
        },
    ]
    chat = messages_response_to_chat(anthropic_message(content, "tool_use"), "a")
    back = chat_response_to_messages(chat, "b")
    assert back["content"] == content
    assert back["stop_reason"] == "tool_use"
    assert back["usage"] == {"input_tokens": 10, "output_tokens": 5}


# --- Anthropic stream -> OpenAI chunks ---------------------------------------------------------


def test_messages_stream_to_chat_with_usage() -> None:
    translator, chunks = run_messages_stream(anthropic_stream_events(), include_usage=True)
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert {(c.id, c.created, c.model, c.object) for c in parsed} == {
        ("msg_01", chunks[0]["created"], "claude-alias", "chat.completion.chunk")
    }
    assert all("usage" in c for c in chunks)
    assert parsed[0].choices[0].delta.role == "assistant"
    assert parsed[0].choices[0].delta.content == ""
    # Tool calls are numbered from 0 although the tool_use block is Anthropic index 1.
    start = next(c for c in parsed if c.choices and c.choices[0].delta.tool_calls)
    call = start.choices[0].delta.tool_calls[0]  # type: ignore[index]
    assert (call.index, call.id, call.type) == (0, "toolu_1", "function")
    assert call.function is not None and call.function.name == "weather"
    # The empty first partial_json produces no chunk.
    assert sum(1 for c in chunks if c["choices"] and "tool_calls" in c["choices"][0]["delta"]) == 3
    assert parsed[-2].choices[0].finish_reason == "tool_calls"
    last = parsed[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        25,
        42,
        67,
    )
    assert translator.usage == (25, 42)

    final = accumulate_openai(chunks)
    message = final.choices[0].message
    assert message.content == "Let me check."
    assert message.tool_calls is not None
    assert orjson.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage is not None and final.usage.total_tokens == 67


def test_messages_stream_to_chat_without_usage() -> None:
    translator, chunks = run_messages_stream(
        anthropic_stream_events("end_turn"), include_usage=False
    )
    assert all("usage" not in c for c in chunks)
    assert all(c["choices"] for c in chunks)  # no usage-only chunk at the end
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert translator.usage == (25, 42)
    assert accumulate_openai(chunks).choices[0].message.content == "Let me check."


def test_messages_stream_usage_updates_and_quiet_events() -> None:
    translator = MessagesStreamToChat("m", include_usage=True)
    translator.feed("message_start", anthropic_stream_events()[0][1])
    assert translator.usage == (25, 1)
    assert translator.feed("ping", {"type": "ping"}) == []
    assert translator.feed("content_block_stop", {"type": "content_block_stop", "index": 0}) == []
    # message_delta may carry cumulative input tokens (server tools); they replace the start value.
    translator.feed(
        None,
        {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens"},
            "usage": {"input_tokens": 40, "output_tokens": 9},
        },
    )
    assert translator.usage == (40, 9)


def test_messages_stream_error_event_raises() -> None:
    translator = MessagesStreamToChat("m", include_usage=False)
    with pytest.raises(StreamError) as info:
        translator.feed(
            "error",
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        )
    assert (info.value.message, info.value.type) == ("Overloaded", "overloaded_error")


# --- OpenAI stream -> Anthropic events ---------------------------------------------------------


def test_chat_stream_to_messages_tool_calls_and_usage() -> None:
    translator, events = run_chat_stream(openai_tool_stream())
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",  # text, index 0
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",  # tool call 0 -> index 1
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",  # tool call 1 -> index 2
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["usage"] == {"input_tokens": 0, "output_tokens": 0}
    assert start["content"] == []
    assert events[-2][1]["usage"] == {"input_tokens": 30, "output_tokens": 12}
    assert translator.usage == (30, 12)

    final = accumulate_anthropic(events)
    assert final.model == "gpt-alias"
    assert final.stop_reason == "tool_use"
    assert final.content[0].type == "text" and final.content[0].text == "Checking both."
    tool_a, tool_b = final.content[1], final.content[2]
    assert tool_a.type == "tool_use" and (tool_a.id, tool_a.name, tool_a.input) == (
        "call_a",
        "weather",
        {"city": "Paris"},
    )
    assert tool_b.type == "tool_use" and (tool_b.id, tool_b.name, tool_b.input) == (
        "call_b",
        "time",
        {},
    )
    assert (final.usage.input_tokens, final.usage.output_tokens) == (30, 12)


def test_chat_stream_usage_only_chunk_emits_nothing() -> None:
    translator = ChatStreamToMessages("m")
    translator.feed(openai_chunk({"role": "assistant", "content": ""}))
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert translator.feed(openai_chunk(None, usage=usage)) == []
    assert translator.usage == (3, 2)


@pytest.mark.parametrize(
    ("finish", "stop"), [("stop", "end_turn"), ("length", "max_tokens"), (None, "end_turn")]
)
def test_chat_stream_text_finish_reasons(finish: str | None, stop: str) -> None:
    chunks = [
        openai_chunk({"role": "assistant"}),
        openai_chunk({"content": "Hi"}),
        openai_chunk({}, finish),
    ]
    _, events = run_chat_stream(chunks)
    final = accumulate_anthropic(events)
    assert final.stop_reason == stop
    assert [b.model_dump(exclude_none=True) for b in final.content] == [
        {"type": "text", "text": "Hi"}
    ]
    assert final.usage.output_tokens == 0  # upstream sent no usage


def test_chat_stream_empty_stream_is_still_a_valid_message() -> None:
    translator = ChatStreamToMessages("m")
    final = accumulate_anthropic(translator.finish())
    assert final.content == []
    assert final.stop_reason == "end_turn"


def test_chat_stream_whole_tool_call_in_one_chunk_after_text() -> None:
    """Some compatible servers send a complete tool call in one chunk and finish with "stop"."""
    call = {
        "index": 0,
        "id": "c9",
        "type": "function",
        "function": {"name": "f", "arguments": '{"x": 1}'},
    }
    chunks = [openai_chunk({"content": "ok"}), openai_chunk({"tool_calls": [call]}, "stop")]
    _, events = run_chat_stream(chunks)
    final = accumulate_anthropic(events)
    assert final.stop_reason == "tool_use"
    assert final.content[1].type == "tool_use" and final.content[1].input == {"x": 1}


def test_stream_round_trip_anthropic_openai_anthropic() -> None:
    """Anthropic events -> OpenAI chunks -> Anthropic events rebuild the same message."""
    original = accumulate_anthropic([(n, d) for n, d in anthropic_stream_events() if n != "ping"])
    _, chunks = run_messages_stream(anthropic_stream_events(), include_usage=True)
    _, events = run_chat_stream(chunks)
    rebuilt = accumulate_anthropic(events)
    assert [b.model_dump() for b in rebuilt.content] == [b.model_dump() for b in original.content]
    assert rebuilt.stop_reason == original.stop_reason == "tool_use"
    assert (rebuilt.usage.input_tokens, rebuilt.usage.output_tokens) == (25, 42)


# --- the official SDK clients, end to end over an in-memory transport --------------------------


def sse_body(frames: list[tuple[str | None, dict[str, Any]]], done: bool = False) -> bytes:
    """Frame events as a provider's SSE body (OpenAI ends with ``[DONE]``)."""
    out = bytearray()
    for name, data in frames:
        if name:
            out += b"event: " + name.encode() + b"\n"
        out += b"data: " + orjson.dumps(data) + b"\n\n"
    if done:
        out += b"data: [DONE]\n\n"
    return bytes(out)


def mock_http(body: bytes, captured: list[dict[str, Any]]) -> httpx2.Client:
    def handler(request: httpx2.Request) -> httpx2.Response:
        captured.append(orjson.loads(request.content))
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    return httpx2.Client(transport=httpx2.MockTransport(handler))


def test_openai_sdk_streams_a_claude_reply() -> None:
    """client.chat.completions.stream() over translated Anthropic events yields the full reply."""
    captured: list[dict[str, Any]] = []
    _, chunks = run_messages_stream(anthropic_stream_events(), include_usage=True)
    http = mock_http(sse_body([(None, c) for c in chunks], done=True), captured)
    client = openai.OpenAI(api_key="k", base_url="http://gateway/v1", http_client=http)
    with client.chat.completions.stream(
        model="claude-alias",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        stream_options={"include_usage": True},
    ) as stream:
        final = stream.get_final_completion()
    assert captured[0]["stream"] is True
    message = final.choices[0].message
    assert message.content == "Let me check."
    assert message.tool_calls is not None
    assert orjson.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage is not None and final.usage.prompt_tokens == 25


def test_anthropic_sdk_streams_an_openai_reply() -> None:
    """client.messages.stream(...).get_final_message() over translated OpenAI chunks."""
    captured: list[dict[str, Any]] = []
    _, events = run_chat_stream(openai_tool_stream())
    http = mock_http(sse_body(list(events)), captured)
    client = anthropic.Anthropic(api_key="k", base_url="http://gateway", http_client=http)
    with client.messages.stream(
        model="gpt-alias", max_tokens=100, messages=[{"role": "user", "content": "Weather?"}]
    ) as stream:
        final = stream.get_final_message()
    assert captured[0]["stream"] is True
    assert final.stop_reason == "tool_use"
    assert final.content[0].type == "text" and final.content[0].text == "Checking both."
    assert final.content[1].type == "tool_use" and final.content[1].input == {"city": "Paris"}
    assert (final.usage.input_tokens, final.usage.output_tokens) == (30, 12)
