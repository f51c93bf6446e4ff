"""Which function tools a reply calls, and with what arguments: one rule for all three APIs.

Tests and agent loops need a provider that uses tools predictably: a call when the user asks
for one, a text answer once the tool has answered (or an agent loop never ends), and
``tool_choice`` honoured as the providers honour it. The rule, for chat completions, messages
and the Responses API alike:

- ``tool_choice`` none (chat/Responses ``"none"``, Anthropic ``{"type": "none"}``): text.
- a forced function (chat ``{"type": "function", "function": {"name": N}}``, Responses
  ``{"type": "function", "name": N}``, Anthropic ``{"type": "tool", "name": N}``): exactly one
  call of N, whatever the conversation ends with, as a provider forces it. N must be offered.
- auto (the default): only when the conversation ends with a user's message (not a tool's
  output), a call of each offered tool the message names (its name as a whole word, any case),
  in the order the tools are listed; if it names none but mentions the weather, the first
  tool. Otherwise text.
- required (chat/Responses ``"required"``, Anthropic ``{"type": "any"}``): as auto, but
  always at least one call (the first tool when the message names none), even after a tool's
  output, as a provider must.
- parallel calls: several calls only while allowed (``parallel_tool_calls`` not false;
  Anthropic: ``disable_parallel_tool_use`` not true), else the first of them.

Arguments fit the tool's parameter schema (``schema.schema_instance``): strings are the place
the message names ("in Paris", "for New York"; capitalised words after in/for/at), else the
message itself. A tool without properties gets ``{"location": PLACE}`` (``"Paris"`` when none
is named). A ``tool_choice`` that forces a tool that is not offered, or any tool when none is,
is a 400, as the APIs answer.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import orjson

from proxy.emulator.schema import schema_instance
from proxy.emulator.wire import Json, _BadRequest

Mode = Literal["auto", "none", "required", "forced"]
ToolCall = tuple[str, str]
"""One call a reply makes: the tool's name and its arguments as JSON text."""

_CITY = re.compile(r"\b(?:in|for|at)\s+([A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)*)")


def tool_arguments(user_text: str, schema: Any) -> Json:
    """Arguments for a tool with parameter ``schema``: a value the schema accepts."""
    match = _CITY.search(user_text)
    place = match.group(1) if match else None
    props = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(props, dict) or not props:
        return {"location": place or "Paris"}
    value = schema_instance(schema, place or user_text)
    return value if isinstance(value, dict) else {}


def _named(name: str, text: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.IGNORECASE) is not None


def pick(
    tools: list[tuple[str, Any]],
    mode: Mode,
    forced: str | None,
    parallel: bool,
    user_turn: bool,
    user_text: str,
) -> list[ToolCall]:
    """The calls to make (none: answer in text); see the module docstring for the rule."""
    if mode == "forced":
        chosen = [t for t in tools if t[0] == forced][:1]
    elif mode == "none" or not tools or (mode == "auto" and not user_turn):
        return []
    else:
        chosen = [t for t in tools if _named(t[0], user_text)]
        if not chosen and (mode == "required" or "weather" in user_text.lower()):
            chosen = tools[:1]
        if not parallel:
            del chosen[1:]
    return [
        (name, orjson.dumps(tool_arguments(user_text, schema)).decode()) for name, schema in chosen
    ]


def _check(tools: list[tuple[str, Any]], mode: Mode, forced: str | None) -> None:
    """A forced or required choice needs tools, and a forced one a tool of that name."""
    if mode in ("required", "forced") and not tools:
        raise _BadRequest(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are "
            "specified.",
            "tool_choice",
        )
    if mode == "forced" and forced not in {name for name, _ in tools}:
        raise _BadRequest(
            f"Invalid value for 'tool_choice': no function named {forced!r} in 'tools'.",
            "tool_choice",
        )


def _openai_choice(choice: Any, nested: bool) -> tuple[Mode, str | None]:
    """OpenAI's ``tool_choice``: a mode string or a function (chat nests its name)."""
    if choice in ("none", "required"):
        return choice, None  # type: ignore[return-value]
    if isinstance(choice, dict) and choice.get("type") == "function":
        holder = choice.get("function") if nested else choice
        name = holder.get("name") if isinstance(holder, dict) else None
        return "forced", name if isinstance(name, str) else ""
    return "auto", None  # "auto", absent, or a choice of a built-in tool


def chat_calls(body: Json, user_turn: bool, user_text: str) -> list[ToolCall]:
    """The calls of a chat completion (``tools[i].function``)."""
    raw = body.get("tools")
    tools = [
        (t["function"]["name"], t["function"].get("parameters"))
        for t in (raw if isinstance(raw, list) else ())
        if isinstance(t, dict)
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
    ]
    mode, forced = _openai_choice(body.get("tool_choice"), nested=True)
    _check(tools, mode, forced)
    parallel = body.get("parallel_tool_calls") is not False
    return pick(tools, mode, forced, parallel, user_turn, user_text)


def responses_calls(body: Json, user_turn: bool, user_text: str) -> list[ToolCall]:
    """The calls of a Responses request (function tools: ``{"type": "function", "name"}``)."""
    raw = body.get("tools")
    tools = [
        (t["name"], t.get("parameters"))
        for t in (raw if isinstance(raw, list) else ())
        if isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("name"), str)
    ]
    mode, forced = _openai_choice(body.get("tool_choice"), nested=False)
    _check(tools, mode, forced)
    parallel = body.get("parallel_tool_calls") is not False
    return pick(tools, mode, forced, parallel, user_turn, user_text)


_ANTHROPIC_MODES: dict[Any, Mode] = {"auto": "auto", "none": "none", "any": "required"}


def messages_calls(body: Json, user_turn: bool, user_text: str) -> list[ToolCall]:
    """The calls of a message (client tools: ``{"name", "input_schema"}``, type absent or
    ``custom``; server tools such as web search are not called)."""
    raw = body.get("tools")
    tools = [
        (t["name"], t.get("input_schema"))
        for t in (raw if isinstance(raw, list) else ())
        if isinstance(t, dict)
        and isinstance(t.get("name"), str)
        and t.get("type") in (None, "custom")
    ]
    choice = body.get("tool_choice")
    choice = choice if isinstance(choice, dict) else {}
    kind = choice.get("type", "auto")
    forced = choice.get("name") if kind == "tool" else None
    mode: Mode = "forced" if kind == "tool" else _ANTHROPIC_MODES.get(kind, "auto")
    if mode == "forced" and not isinstance(forced, str):
        raise _BadRequest("tool_choice.name: Field required", "tool_choice.name")
    _check(tools, mode, forced)
    parallel = choice.get("disable_parallel_tool_use") is not True
    return pick(tools, mode, forced, parallel, user_turn, user_text)
