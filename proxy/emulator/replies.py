"""The deterministic reply both dialects send, and the token rule.

Replies are deterministic (``"Echo:"`` plus the words of the last user message) so tests can
assert exact output, and tokens follow one rule (whitespace-separated words, at least 1) so
usage metering can be checked by hand. A user asking about the weather while tools are offered
gets a tool call instead of text.
"""

from __future__ import annotations

import itertools
import re

from proxy.emulator.wire import Json

_FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
_CITY = re.compile(r"\b(?:in|for|at)\s+([A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)*)")


def _count(text: str) -> int:
    """The emulator's token rule: whitespace-separated words, at least 1."""
    return max(1, len(text.split()))


def _reply(prompt: str, words: int | None, limit: int | None) -> tuple[list[str], bool]:
    """The deterministic reply words and whether ``limit`` cut them short."""
    out = ["Echo:", *prompt.split()]
    if words is not None:
        if len(out) < words:
            out.extend(itertools.islice(itertools.cycle(_FILLER), words - len(out)))
        del out[words:]
    if limit is not None and len(out) > limit:
        del out[limit:]
        return out, True
    return out, False


def _pieces(words: list[str]) -> list[str]:
    """Stream deltas, one per word, that concatenate back to the non-stream text."""
    return [words[0], *(" " + w for w in words[1:])]


def _tool_name(body: Json, user_text: str) -> str | None:
    """The tool to 'call' when tools are offered and the user asks about the weather."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools or "weather" not in user_text.lower():
        return None
    choice = body.get("tool_choice")
    if choice == "none" or (isinstance(choice, dict) and choice.get("type") == "none"):
        return None
    first = tools[0] if isinstance(tools[0], dict) else {}
    fn = first.get("function")
    name = fn.get("name") if isinstance(fn, dict) else first.get("name")
    return name if isinstance(name, str) and name else "get_weather"


def _tool_input(user_text: str) -> Json:
    match = _CITY.search(user_text)
    return {"location": match.group(1) if match else "Paris"}


def _split(text: str, size: int = 8) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]
