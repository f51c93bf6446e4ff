"""Reading a request: its model, messages and prompts, checked as the real API checks them.

A field the real API would refuse raises ``_BadRequest``, which the route wrapper renders as a
400 in the endpoint's dialect. Message contents (strings or lists of blocks) are read as plain
text, the only form the emulator's replies and token counts use.
"""

from __future__ import annotations

from typing import Any

from proxy.emulator.wire import Json, _BadRequest


def _text(content: Any) -> str:
    """The plain text of a message content: a string or a list of text/tool_result blocks."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content if isinstance(content, list) else ():
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict):
            text = block.get("text")
            if isinstance(text, str):
                parts.append(text)
            elif block.get("type") == "tool_result":
                parts.append(_text(block.get("content")))
    return " ".join(parts)


def _model(body: Json) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("you must provide a model parameter", "model")
    return model


def _messages(body: Json) -> list[Json]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty array", "messages")
    if not all(isinstance(m, dict) for m in messages):
        raise _BadRequest("each message must be an object", "messages")
    return messages


def _last_user_text(messages: list[Json]) -> str:
    return next(
        (_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
    )


def _prompts(raw: Any, param: str) -> list[str]:
    """Strings, or token-id arrays rendered as text (so each id counts as one token)."""
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(x, str) for x in raw):
            return raw
        if all(isinstance(x, int) for x in raw):
            return [" ".join(map(str, raw))]
        if all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in raw):
            return [" ".join(map(str, x)) for x in raw]
    raise _BadRequest(f"'{param}' must be a string, or an array of strings or tokens", param)


def _positive(body: Json, name: str, default: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _BadRequest(f"'{name}' must be a positive integer", name)
    return value
