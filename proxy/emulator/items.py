"""Reading a Responses API request: its ``input`` items, tools and output format.

The Responses API takes ``input`` as a string or a list of items (messages, function calls
and their outputs, reasoning, ...). They are checked as the API checks them (a bad item is a
400 naming ``input[i]``), given ids as the API stores them (``GET .../input_items`` lists
them with ids), and read as plain text for the emulator's replies and token counts.
"""

from __future__ import annotations

from typing import Any

from proxy.emulator.prompts import _text
from proxy.emulator.wire import Json, _BadRequest

_ROLES = frozenset({"user", "system", "developer", "assistant"})
# items a client may send back as context; the emulator keeps them but does not read them
_CONTEXT_ITEMS = frozenset(
    {
        "reasoning",
        "item_reference",
        "web_search_call",
        "file_search_call",
        "computer_call",
        "computer_call_output",
        "code_interpreter_call",
        "image_generation_call",
        "custom_tool_call",
        "custom_tool_call_output",
    }
)
# built-in tools the API runs itself; accepted (a web search is acted out, see responses)
BUILTIN_TOOLS = frozenset(
    {
        "web_search",
        "web_search_2025_08_26",
        "web_search_preview",
        "web_search_preview_2025_03_11",
        "file_search",
        "code_interpreter",
        "image_generation",
        "computer_use_preview",
        "mcp",
        "local_shell",
        "shell",
        "custom",
        "apply_patch",
    }
)
_FORMATS = ("text", "json_object", "json_schema")


def input_items(body: Json) -> list[Json]:
    """``input`` as a checked list of items; a string is one user message."""
    raw = body.get("input")
    if raw is None:
        return []
    if isinstance(raw, str):
        return [{"type": "message", "role": "user", "content": raw}]
    if not isinstance(raw, list):
        raise _BadRequest(
            "Invalid type for 'input': expected a string or an array of input items.", "input"
        )
    for i, item in enumerate(raw):
        _check_item(item, i)
    return raw


def _check_item(item: Any, i: int) -> None:
    where = f"input[{i}]"
    if not isinstance(item, dict):
        raise _BadRequest(f"Invalid type for '{where}': expected an object.", where)
    kind = item.get("type", "message")
    if kind == "message":
        if item.get("role") not in _ROLES:
            raise _BadRequest(
                f"Invalid value for '{where}.role': expected one of 'user', 'system', "
                "'developer' or 'assistant'.",
                f"{where}.role",
            )
        if not isinstance(item.get("content"), str | list):
            raise _BadRequest(f"Missing required parameter: '{where}.content'.", f"{where}.content")
    elif kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise _BadRequest(f"Missing required parameter: '{where}.call_id'.", f"{where}.call_id")
        if not isinstance(item.get("output"), str | list):
            raise _BadRequest(f"Missing required parameter: '{where}.output'.", f"{where}.output")
    elif kind == "function_call":
        for field in ("call_id", "name", "arguments"):
            if not isinstance(item.get(field), str):
                raise _BadRequest(
                    f"Missing required parameter: '{where}.{field}'.", f"{where}.{field}"
                )
    elif kind not in _CONTEXT_ITEMS:
        raise _BadRequest(f"Invalid value: '{kind}'. Unknown input item type.", f"{where}.type")


def stored_item(item: Json, new_id: Any) -> Json:
    """An input item as ``GET /v1/responses/{id}/input_items`` lists it: with an id, a status,
    and message content as a list of parts."""
    kind = item.get("type", "message")
    out = dict(item)
    out["type"] = kind
    if kind == "message":
        role = item.get("role")
        content = item.get("content")
        part = "output_text" if role == "assistant" else "input_text"
        if isinstance(content, str):
            content = [{"type": part, "text": content}]
        if role == "assistant" and isinstance(content, list):
            content = [{"annotations": [], **p} if isinstance(p, dict) else p for p in content]
        out["content"] = content
        out.setdefault("id", new_id("msg_"))
        out.setdefault("status", "completed")
    elif kind == "function_call_output":
        out.setdefault("id", new_id("fco_"))
        out.setdefault("status", "completed")
    elif kind == "function_call":
        out.setdefault("id", new_id("fc_"))
        out.setdefault("status", "completed")
    else:
        out.setdefault("id", new_id("item_"))
    return out


def item_text(item: Json) -> str:
    """The plain text of one item: what its tokens are counted on."""
    kind = item.get("type", "message")
    if kind == "message":
        return _text(item.get("content"))
    if kind == "function_call_output":
        return _text(item.get("output"))
    if kind == "function_call":
        return str(item.get("arguments", ""))
    return ""


def last_user_text(items: list[Json]) -> str:
    for item in reversed(items):
        if item.get("type", "message") == "message" and item.get("role") == "user":
            return _text(item.get("content"))
    return ""


def check_tools(body: Json) -> bool:
    """Check ``tools`` as the API does; True if a web search tool is offered."""
    tools = body.get("tools")
    if tools is None:
        return False
    if not isinstance(tools, list):
        raise _BadRequest("Invalid type for 'tools': expected an array.", "tools")
    search = False
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "function":
            if not isinstance(tool.get("name"), str) or not tool["name"]:
                raise _BadRequest(
                    f"Missing required parameter: 'tools[{i}].name'.", f"tools[{i}].name"
                )
        elif kind in BUILTIN_TOOLS:
            search = search or str(kind).startswith("web_search")
        else:
            raise _BadRequest(f"Invalid value: '{kind}'. Unknown tool type.", f"tools[{i}].type")
    return search


def text_format(body: Json) -> Json:
    """``text.format``, checked: ``{"type": "text"}`` when absent."""
    text = body.get("text")
    if text is None:
        return {"type": "text"}
    if not isinstance(text, dict):
        raise _BadRequest("Invalid type for 'text': expected an object.", "text")
    fmt = text.get("format")
    if fmt is None:
        return {"type": "text"}
    if not isinstance(fmt, dict) or fmt.get("type") not in _FORMATS:
        raise _BadRequest(
            "Invalid value for 'text.format.type': expected one of 'text', 'json_object' or "
            "'json_schema'.",
            "text.format.type",
        )
    if fmt["type"] == "json_schema":
        if not isinstance(fmt.get("name"), str) or not fmt["name"]:
            raise _BadRequest("Missing required parameter: 'text.format.name'.", "text.format.name")
        if not isinstance(fmt.get("schema"), dict):
            raise _BadRequest(
                "Missing required parameter: 'text.format.schema'.", "text.format.schema"
            )
    return fmt
