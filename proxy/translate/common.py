"""What the request, response and stream translations share, so every phase maps alike.

Stop/finish reasons, tool calls <-> tool_use blocks, plain text of content, the OpenAI usage
object (the counts are read by ``proxy.tokens``), an Anthropic assistant turn as an OpenAI
message and the empty Anthropic message. Tool arguments are the one JSON round trip: OpenAI
carries them as a string, Anthropic as an object. The other modules import these names into
their own globals: a call costs what it would in one module.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

_STOP_TO_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_FINISH_TO_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "end_turn",
}


def stop_to_chat_finish(reason: str | None) -> str | None:
    """Anthropic ``stop_reason`` -> OpenAI ``finish_reason`` (unknown reasons read as a stop)."""
    if reason is None:
        return None
    return _STOP_TO_FINISH.get(reason, "stop")


def chat_finish_to_stop(reason: str | None) -> str | None:
    """OpenAI ``finish_reason`` -> Anthropic ``stop_reason`` (unknown reasons end the turn)."""
    if reason is None:
        return None
    return _FINISH_TO_STOP.get(reason, "end_turn")


def _dumps(value: Any) -> str:
    """JSON text for tool arguments: OpenAI carries them as a string, Anthropic as an object."""
    return orjson.dumps(value).decode()


def _parse_args(arguments: Any) -> dict[str, Any]:
    """Tool arguments string -> object; Anthropic rejects a non-object ``input``, so fall back."""
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _chat_tool_call(block: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic tool_use block -> an OpenAI tool call (arguments as a JSON string)."""
    return {
        "id": block.get("id", ""),
        "type": "function",
        "function": {"name": block.get("name", ""), "arguments": _dumps(block.get("input") or {})},
    }


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call (or its first stream delta) -> an Anthropic tool_use block."""
    fn = call.get("function") or {}
    return {
        "type": "tool_use",
        "id": call.get("id") or f"toolu_{uuid.uuid4().hex}",
        "name": fn.get("name") or "",
        "input": _parse_args(fn.get("arguments")),
    }


def _text_of(content: Any) -> str:
    """Plain text of a string or a list of text parts/blocks (system prompts, tool results)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def _chat_usage(prompt: int, completion: int, cached: int | None = None) -> dict[str, Any]:
    """An OpenAI ``usage`` object (``total_tokens`` is required by the SDK)."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def _assistant_turn(blocks: Any) -> dict[str, Any]:
    """Anthropic assistant blocks -> an OpenAI assistant message: text joined, tool_use as calls.

    Thinking and server-tool blocks have no Chat Completions equivalent and are dropped.
    """
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in blocks or ():
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            calls.append(_chat_tool_call(block))
    turn: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        turn["tool_calls"] = calls
    return turn


def _message_start(msg_id: str, model: str) -> dict[str, Any]:
    """An empty assistant message: the ``message_start`` payload and the base of a response."""
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": model,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }
