"""Whole-response translation both ways: Anthropic message <-> OpenAI ``chat.completion``.

A non-streamed provider reply is mapped once, into the client's dialect, before the relay runs
the response hooks and sends it: content, tool calls, stop reason and usage.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from proxy.tokens import anthropic_cached, anthropic_tokens, openai_tokens
from proxy.translate.common import (
    _assistant_turn,
    _chat_usage,
    _message_start,
    _text_of,
    _tool_use,
    chat_finish_to_stop,
    stop_to_chat_finish,
)

# --- Anthropic response -> OpenAI response -----------------------------------------------------


def messages_response_to_chat(resp: dict[str, Any], model: str) -> dict[str, Any]:
    """Anthropic message -> OpenAI ``chat.completion`` (one choice)."""
    message = _assistant_turn(resp.get("content"))
    if message["content"] is None and "tool_calls" not in message:
        message["content"] = ""
    message["refusal"] = None
    finish = stop_to_chat_finish(resp.get("stop_reason")) or "stop"
    usage = resp.get("usage") or {}
    prompt, completion = anthropic_tokens(usage)
    return {
        "id": resp.get("id") or f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": _chat_usage(prompt, completion, anthropic_cached(usage)),
    }


# --- OpenAI response -> Anthropic response -----------------------------------------------------


def chat_response_to_messages(resp: dict[str, Any], model: str) -> dict[str, Any]:
    """OpenAI ``chat.completion`` -> Anthropic message (first choice only)."""
    out = _message_start(resp.get("id") or f"msg_{uuid.uuid4().hex}", model)
    choices = resp.get("choices") or ()
    choice = choices[0] if choices else {}
    message = choice.get("message") or {}
    content = out["content"]
    text = message.get("content") or message.get("refusal")
    if isinstance(text, list):
        text = _text_of(text)
    if text:
        content.append({"type": "text", "text": text})
    content.extend(map(_tool_use, message.get("tool_calls") or ()))
    reason = choice.get("finish_reason")
    if reason == "stop" and message.get("tool_calls"):
        reason = "tool_calls"  # some OpenAI-compatible servers say "stop" after tool calls
    out["stop_reason"] = chat_finish_to_stop(reason) or "end_turn"
    prompt, completion = openai_tokens(resp.get("usage") or {})
    out["usage"] = {"input_tokens": prompt, "output_tokens": completion}
    return out
