"""The texts of a request as a provider would read them, for plugins that look at the prompt.

One walker for every body shape the gateway accepts (OpenAI chat and completions, Anthropic
messages, embeddings), so privacy redacts and routing scores exactly the same texts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _blocks(value: Any, fn: Callable[[str], str | None]) -> Any:
    """Apply ``fn`` to the texts of a message content (a string or a list of blocks); where
    it returns a string, that replaces the text."""
    if isinstance(value, str):
        out = fn(value)
        return value if out is None else out
    if isinstance(value, list):
        for block in value:
            if isinstance(block, dict):
                text = block.get("text")
                if isinstance(text, str):
                    out = fn(text)
                    if out is not None:
                        block["text"] = out
                if "content" in block:  # Anthropic tool_result blocks nest a content
                    block["content"] = _blocks(block["content"], fn)
    return value


def visit_texts(body: dict[str, Any], fn: Callable[[str], str | None]) -> None:
    """Call ``fn`` on every text of a chat, messages, completions or embeddings request,
    replacing a text where ``fn`` returns a string (None leaves it)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if not isinstance(m, dict):
                continue
            if "content" in m:
                m["content"] = _blocks(m["content"], fn)
            calls = m.get("tool_calls")  # an assistant's earlier calls: arguments are text too
            if isinstance(calls, list):
                for call in calls:
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                        out = fn(function["arguments"])
                        if out is not None:
                            function["arguments"] = out
    if "system" in body:
        body["system"] = _blocks(body["system"], fn)
    for field in ("prompt", "input"):
        value = body.get(field)
        if isinstance(value, str):
            body[field] = _blocks(value, fn)
        elif isinstance(value, list):  # a batch of prompts or inputs: the strings among them
            for i, v in enumerate(value):
                if isinstance(v, str) and (out := fn(v)) is not None:
                    value[i] = out


def texts_of(content: Any) -> list[str]:
    """The texts of one message content (a string, or the text of its blocks)."""
    out: list[str] = []
    _blocks(content, out.append)  # type: ignore[arg-type]
    return out
