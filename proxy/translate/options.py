"""Request options that change the answer, both ways: reasoning, output format, service tier,
web search, n.

Each has a counterpart of another shape on the other side (a reasoning effort against a
thinking budget, a ``response_format`` against ``output_config.format``); what has none raises
``Unsupported`` naming the field, so the client hears of it instead of getting another
answer. ``request`` calls these while it builds the provider's body; the decisions and their
examples are listed in ``fields``.
"""

from __future__ import annotations

from typing import Any

from proxy.translate.fields import Unsupported

MAX_CHOICES = 128
"""The most choices (``n``) a request may ask for, as OpenAI allows."""

EFFORT_BUDGET = {
    "minimal": 1024,
    "low": 2048,
    "medium": 8192,
    "high": 16384,
    "xhigh": 32768,
    "max": 65536,
}
"""OpenAI's ``reasoning_effort`` -> Anthropic's ``thinking.budget_tokens``."""

_MIN_BUDGET = 1024  # Anthropic refuses a smaller thinking budget
_BUDGET_EFFORT = ((4096, "low"), (16384, "medium"), (32768, "high"), (65536, "xhigh"))
"""Anthropic's ``budget_tokens`` -> OpenAI's effort: the first bound it is below (else max)."""

_EFFORTS = frozenset({"low", "medium", "high", "xhigh", "max"})  # output_config.effort's names
_TIER_TO_ANTHROPIC = {
    "auto": "auto",
    "priority": "auto",
    "fast": "auto",
    "scale": "auto",
    "default": "standard_only",
}
_TIER_TO_OPENAI = {"auto": "auto", "standard_only": "default"}
WEB_SEARCH_TOOL = "web_search_20250305"


# --- OpenAI request -> Anthropic request -------------------------------------------------------


def choices(body: dict[str, Any]) -> int:
    """The ``n`` an OpenAI client asked of a Claude model (1 when absent); refuses a bad one,
    and several choices in a stream (each would need its own stream, interleaved)."""
    n = body.get("n")
    if n is None or n == 1:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CHOICES:
        raise Unsupported("n", f"it must be an integer from 1 to {MAX_CHOICES}")
    if body.get("stream") is True:
        raise Unsupported(
            "n", "Claude answers one choice per call, and several cannot be streamed as one"
        )
    return n


def thinking_for_effort(
    effort: Any, max_tokens: int | None, default_max_tokens: int
) -> tuple[dict[str, Any], int]:
    """``reasoning_effort`` -> (Anthropic ``thinking``, ``max_tokens``).

    The budget counts in ``max_tokens`` (as reasoning counts in OpenAI's
    ``max_completion_tokens``), so a client's limit caps it; without one, the answer keeps
    ``default_max_tokens`` beside the budget.
    """
    if effort == "none":
        return {"type": "disabled"}, max_tokens or default_max_tokens
    budget = EFFORT_BUDGET.get(effort) if isinstance(effort, str) else None
    if budget is None:
        names = ", ".join(["none", *EFFORT_BUDGET])
        raise Unsupported("reasoning_effort", f"it must be one of {names}")
    if max_tokens is None:
        return {"type": "enabled", "budget_tokens": budget}, default_max_tokens + budget
    if max_tokens <= _MIN_BUDGET:
        raise Unsupported(
            "reasoning_effort",
            f"Claude thinks in at least {_MIN_BUDGET} tokens, which must fit below the "
            f"token limit ({max_tokens}); raise max_completion_tokens or leave out "
            "reasoning_effort",
        )
    return {"type": "enabled", "budget_tokens": min(budget, max_tokens - 1)}, max_tokens


def output_format(fmt: Any) -> dict[str, Any] | None:
    """``response_format`` -> Anthropic ``output_config`` (``None`` for plain text)."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"format": {"type": "json_schema", "schema": {"type": "object"}}}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise Unsupported("response_format", "json_schema.schema must be a JSON schema")
        return {"format": {"type": "json_schema", "schema": schema}}
    raise Unsupported("response_format", f"type {kind!r} is not text, json_object or json_schema")


def tier_to_anthropic(tier: Any) -> str:
    """OpenAI ``service_tier`` -> Anthropic's; ``flex`` (cheaper, slower) has no equivalent."""
    out = _TIER_TO_ANTHROPIC.get(tier) if isinstance(tier, str) else None
    if out is None:
        raise Unsupported(
            "service_tier",
            f"{tier!r} has no Anthropic equivalent (auto, default, priority, fast and scale do)",
        )
    return out


def web_search_tool(options: Any) -> dict[str, Any]:
    """``web_search_options`` -> Claude's web search server tool."""
    options = options if isinstance(options, dict) else {}
    size = options.get("search_context_size")
    if size not in (None, "medium"):
        raise Unsupported(
            "web_search_options",
            f"search_context_size {size!r} has no Anthropic equivalent (medium does)",
        )
    tool: dict[str, Any] = {"type": WEB_SEARCH_TOOL, "name": "web_search"}
    location = options.get("user_location")
    if isinstance(location, dict):
        approx = location.get("approximate") or {}
        tool["user_location"] = {"type": "approximate", **approx}
    return tool


def anthropic_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI function tool -> an Anthropic tool; a custom (grammar) tool is refused."""
    if tool.get("type", "function") != "function":
        raise Unsupported(
            "tools", f"{tool.get('type')!r} tools have no Anthropic equivalent (function does)"
        )
    fn = tool.get("function") or {}
    out = {
        "name": fn.get("name", ""),
        "description": fn.get("description", ""),
        "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
    }
    if fn.get("strict") is not None:
        out["strict"] = fn["strict"]
    return out


def allowed_tools(choice: dict[str, Any], tools: list[dict[str, Any]]) -> tuple[str, list[Any]]:
    """An ``allowed_tools`` tool choice: (its mode, the offered tools it allows).

    Anthropic has no allowed subset, so the other tools are not offered at all: the model may
    call exactly the same ones.
    """
    spec = choice.get("allowed_tools") or {}
    names = {
        (t.get("function") or {}).get("name")
        for t in spec.get("tools") or ()
        if isinstance(t, dict)
    }
    kept = [t for t in tools if t.get("name") in names or t.get("type") == WEB_SEARCH_TOOL]
    return str(spec.get("mode") or "auto"), kept


# --- Anthropic request -> OpenAI request -------------------------------------------------------


def effort_for_thinking(thinking: Any) -> str | None:
    """Anthropic ``thinking`` -> OpenAI ``reasoning_effort`` (``None``: the model decides)."""
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "disabled":
        return "none"
    if kind != "enabled":
        return None  # adaptive: the model decides, as OpenAI's default effort does
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int) or isinstance(budget, bool):
        raise Unsupported("thinking", "budget_tokens must be an integer")
    return next((effort for bound, effort in _BUDGET_EFFORT if budget < bound), "max")


def _strict_ok(schema: Any) -> bool:
    """Whether OpenAI's strict mode takes ``schema``: every object closed
    (``additionalProperties: false``) and every property required, all the way down."""
    if not isinstance(schema, dict):
        return True
    props = schema.get("properties")
    props = props if isinstance(props, dict) else {}
    if schema.get("type") == "object" or props:
        if schema.get("additionalProperties") is not False:
            return False
        if set(props) - set(schema.get("required") or ()):
            return False
    subs: list[Any] = list(props.values())
    for key in ("$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            subs.extend(schema[key].values())
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(schema.get(key), list):
            subs.extend(schema[key])
    subs.append(schema.get("items"))
    return all(map(_strict_ok, subs))


def response_format(config: Any) -> tuple[dict[str, Any] | None, str | None]:
    """``output_config`` -> (OpenAI ``response_format``, ``reasoning_effort``)."""
    if not isinstance(config, dict):
        return None, None
    effort = config.get("effort")
    if effort is not None and effort not in _EFFORTS:
        raise Unsupported("output_config", f"effort {effort!r} is not one of {sorted(_EFFORTS)}")
    fmt = config.get("format")
    if fmt is None:
        return None, effort
    schema = fmt.get("schema") if isinstance(fmt, dict) else None
    if (
        not isinstance(fmt, dict)
        or fmt.get("type") != "json_schema"
        or not isinstance(schema, dict)
    ):
        raise Unsupported("output_config", "format must be {type: json_schema, schema}")
    spec = {"name": "output", "schema": schema, "strict": _strict_ok(schema)}
    return {"type": "json_schema", "json_schema": spec}, effort


def tier_to_openai(tier: Any) -> str:
    """Anthropic ``service_tier`` -> OpenAI's."""
    out = _TIER_TO_OPENAI.get(tier) if isinstance(tier, str) else None
    if out is None:
        raise Unsupported("service_tier", f"{tier!r} is not auto or standard_only")
    return out


def web_search_options(tool: dict[str, Any]) -> dict[str, Any]:
    """Claude's web search tool -> OpenAI ``web_search_options``; its domain lists and use
    limit have no OpenAI equivalent."""
    for key in ("allowed_domains", "blocked_domains", "max_uses"):
        if tool.get(key) is not None:
            raise Unsupported("tools", f"the web search tool's {key} has no OpenAI equivalent")
    out: dict[str, Any] = {}
    location = tool.get("user_location")
    if isinstance(location, dict):
        approx = {k: v for k, v in location.items() if k != "type"}
        out["user_location"] = {"type": "approximate", "approximate": approx}
    return out


def openai_tools(tools: Any) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Anthropic tools -> (OpenAI function tools, ``web_search_options`` or ``None``)."""
    out: list[dict[str, Any]] = []
    search: dict[str, Any] | None = None
    for tool in tools or ():
        kind = tool.get("type") or "custom"
        if kind == "custom":
            fn = {
                "name": tool.get("name", ""),
                "description": tool.get("description", ""),
                "parameters": tool.get("input_schema") or {"type": "object", "properties": {}},
            }
            if tool.get("strict") is not None:
                fn["strict"] = tool["strict"]
            out.append({"type": "function", "function": fn})
        elif isinstance(kind, str) and kind.startswith("web_search_"):
            search = web_search_options(tool)
        else:
            raise Unsupported(
                "tools",
                f"the server tool {kind!r} has no OpenAI chat completions equivalent "
                "(custom tools and web search do)",
            )
    return out, search
