"""Request translation both ways: OpenAI chat request <-> Anthropic Messages request.

The handler rewrites a client's body into the serving provider's dialect before the call:
system prompts, content parts, tool calls and results, tool choice, sampling and the options
of ``options`` are mapped, and same-role turns merge because Anthropic alternates roles. Every
field is first checked against its direction's table (``fields``): one the serving provider
cannot honour raises ``Unsupported`` (a 400 naming it), never vanishes. ``DEFAULT_MAX_TOKENS``
fills Anthropic's required ``max_tokens``.
"""

from __future__ import annotations

from typing import Any

from proxy.translate import options
from proxy.translate.common import _assistant_turn, _text_of, _tool_use
from proxy.translate.fields import ANTHROPIC_TO_OPENAI, OPENAI_TO_ANTHROPIC, Unsupported, check

DEFAULT_MAX_TOKENS = 4096

_TOOL_CHOICE_TO_ANTHROPIC = {"auto": "auto", "none": "none", "required": "any"}
_TOOL_CHOICE_TO_OPENAI = {"auto": "auto", "none": "none", "any": "required"}


# --- OpenAI request -> Anthropic request -------------------------------------------------------


def _data_url_source(url: str) -> dict[str, Any] | None:
    """``data:<mime>;base64,<data>`` -> an Anthropic base64 source; ``None`` if not one."""
    if not url.startswith("data:"):
        return None
    header, _, data = url[5:].partition(",")
    media_type, _, encoding = header.partition(";")
    if encoding != "base64":
        return None
    return {"type": "base64", "media_type": media_type, "data": data}


def _chat_part_to_block(part: dict[str, Any]) -> dict[str, Any] | None:
    """One OpenAI content part -> an Anthropic content block (``None`` for empty text); a
    part Claude cannot read (audio, a file by id) is refused."""
    kind = part.get("type")
    if kind == "text" or kind == "refusal":
        text = part.get("text") if kind == "text" else part.get("refusal")
        return {"type": "text", "text": text} if text else None
    if kind == "image_url":
        url = (part.get("image_url") or {}).get("url", "")
        source = _data_url_source(url) or {"type": "url", "url": url}
        return {"type": "image", "source": source}
    if kind == "file":
        data = (part.get("file") or {}).get("file_data")
        if isinstance(data, str) and data:
            pdf = {"type": "base64", "media_type": "application/pdf", "data": data}
            return {"type": "document", "source": _data_url_source(data) or pdf}
        raise Unsupported("messages", "a file by id cannot be read by Claude; send file_data")
    raise Unsupported("messages", f"a {kind!r} content part has no Anthropic equivalent")


def _chat_content_to_blocks(content: Any) -> list[dict[str, Any]]:
    """OpenAI message content (string or parts) -> Anthropic blocks, without empty text."""
    if not content:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in map(_chat_part_to_block, content) if b is not None]


def _append_message(messages: list[dict[str, Any]], role: str, content: Any) -> None:
    """Append a turn, merging into the previous one of the same role (Anthropic alternates)."""
    if messages and messages[-1]["role"] == role:
        prev = messages[-1]
        if isinstance(prev["content"], str):
            prev["content"] = [{"type": "text", "text": prev["content"]}] if prev["content"] else []
        if isinstance(content, str):
            content = [{"type": "text", "text": content}] if content else []
        prev["content"].extend(content)
    else:
        messages.append({"role": role, "content": content})


def _tool_choice_to_anthropic(
    choice: Any, parallel: Any, tools: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """OpenAI ``tool_choice`` (+ ``parallel_tool_calls``) -> Anthropic ``tool_choice``; an
    ``allowed_tools`` choice narrows ``tools`` in place."""
    out: dict[str, Any] | None
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        choice, tools[:] = options.allowed_tools(choice, tools)
    if isinstance(choice, str):
        out = {"type": _TOOL_CHOICE_TO_ANTHROPIC.get(choice, "auto")}
    elif isinstance(choice, dict):
        if choice.get("type", "function") != "function":
            raise Unsupported("tool_choice", f"a {choice.get('type')!r} tool cannot be forced")
        out = {"type": "tool", "name": (choice.get("function") or {}).get("name", "")}
    else:
        out = None
    if parallel is False:
        out = out or {"type": "auto"}
        if out["type"] != "none":
            out["disable_parallel_tool_use"] = True
    return out


def chat_to_messages_request(
    body: dict[str, Any], upstream_model: str, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> dict[str, Any]:
    """OpenAI chat request -> Anthropic Messages request; ``Unsupported`` for a field that
    Anthropic cannot honour (``fields.OPENAI_TO_ANTHROPIC``)."""
    check(body, OPENAI_TO_ANTHROPIC)
    options.choices(body)  # the handler makes the n calls; a bad n is refused here
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for msg in body.get("messages") or ():
        role = msg.get("role")
        content = msg.get("content")
        if role == "system" or role == "developer":
            text = _text_of(content)
            if text:
                system.append(text)
        elif role == "tool":
            result: Any = content if isinstance(content, str) else _chat_content_to_blocks(content)
            block = {"type": "tool_result", "tool_use_id": msg.get("tool_call_id", "")}
            if result:
                block["content"] = result
            _append_message(messages, "user", [block])
        elif role == "assistant":
            tool_calls = msg.get("tool_calls")
            if not tool_calls and isinstance(content, str) and content:
                _append_message(messages, "assistant", content)
                continue
            blocks = _chat_content_to_blocks(content)
            blocks.extend(map(_tool_use, tool_calls or ()))
            if blocks:
                _append_message(messages, "assistant", blocks)
        elif role == "user":
            user: Any = content if isinstance(content, str) else _chat_content_to_blocks(content)
            _append_message(messages, "user", user)
        else:
            raise Unsupported("messages", f"a {role!r} message has no Anthropic equivalent")

    out: dict[str, Any] = {"model": upstream_model, "messages": messages}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    effort = body.get("reasoning_effort")
    if effort is not None:
        out["thinking"], max_tokens = options.thinking_for_effort(
            effort, max_tokens, default_max_tokens
        )
    out["max_tokens"] = max_tokens or default_max_tokens
    if system:
        out["system"] = "\n\n".join(system)
    temperature = body.get("temperature")
    if temperature is not None:
        out["temperature"] = min(temperature, 1.0)  # OpenAI allows 0..2, Anthropic 0..1
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("stream"):
        out["stream"] = True
    tools = [options.anthropic_tool(t) for t in body.get("tools") or ()]
    if body.get("web_search_options") is not None:
        tools.append(options.web_search_tool(body["web_search_options"]))
    if tools:
        choice = _tool_choice_to_anthropic(
            body.get("tool_choice"), body.get("parallel_tool_calls"), tools
        )
        if tools:
            out["tools"] = tools
            if choice:
                out["tool_choice"] = choice
    user = body.get("safety_identifier") or body.get("user")
    if user:
        out["metadata"] = {"user_id": user}
    if body.get("response_format") is not None:
        config = options.output_format(body["response_format"])
        if config:
            out["output_config"] = config
    if body.get("service_tier") is not None:
        out["service_tier"] = options.tier_to_anthropic(body["service_tier"])
    return out


# --- Anthropic request -> OpenAI request -------------------------------------------------------


def _anthropic_block_to_part(block: dict[str, Any]) -> dict[str, Any]:
    """One Anthropic text/image/document block -> an OpenAI content part; a block OpenAI
    cannot take (a document by URL or file id, a search result...) is refused."""
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": block.get("text", "")}
    source = block.get("source") or {}
    if kind == "image":
        if source.get("type") == "base64":
            url = f"data:{source.get('media_type')};base64,{source.get('data')}"
        else:
            url = source.get("url", "")
        return {"type": "image_url", "image_url": {"url": url}}
    if kind == "document":
        if source.get("type") == "base64":
            data = f"data:{source.get('media_type')};base64,{source.get('data')}"
            return {"type": "file", "file": {"file_data": data, "filename": "document.pdf"}}
        if source.get("type") == "text":
            return {"type": "text", "text": source.get("data", "")}
        raise Unsupported(
            "messages",
            f"a document from a {source.get('type')!r} source cannot be sent to OpenAI; send "
            "it as base64 or text",
        )
    raise Unsupported("messages", f"a {kind!r} block has no OpenAI chat completions equivalent")


def _parts_content(parts: list[dict[str, Any]]) -> Any:
    """A single text part becomes a plain string: the form every OpenAI-compatible server takes."""
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def _anthropic_message_to_chat(msg: dict[str, Any], out: list[dict[str, Any]]) -> None:
    """Append the OpenAI messages for one Anthropic turn (tool results become ``tool`` turns)."""
    role = msg.get("role")
    content = msg.get("content")
    if isinstance(content, str):
        out.append({"role": role, "content": content})
        return
    if role == "assistant":
        out.append(_assistant_turn(content))
        return
    parts: list[dict[str, Any]] = []
    for block in content or ():
        if block.get("type") == "tool_result":
            result = block.get("content")
            if isinstance(result, list):
                # OpenAI tool messages carry text only; images go to the following user turn.
                parts.extend(_anthropic_block_to_part(b) for b in result if b.get("type") != "text")
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": block.get("tool_use_id", ""),
                    "content": _text_of(result),
                }
            )
        else:
            parts.append(_anthropic_block_to_part(block))
    if parts:
        out.append({"role": "user", "content": _parts_content(parts)})


def messages_to_chat_request(body: dict[str, Any], upstream_model: str) -> dict[str, Any]:
    """Anthropic Messages request -> OpenAI chat request; ``Unsupported`` for a field that
    OpenAI cannot honour (``fields.ANTHROPIC_TO_OPENAI``)."""
    check(body, ANTHROPIC_TO_OPENAI)
    messages: list[dict[str, Any]] = []
    system = _text_of(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for msg in body.get("messages") or ():
        _anthropic_message_to_chat(msg, messages)
    out: dict[str, Any] = {"model": upstream_model, "messages": messages}
    if body.get("max_tokens") is not None:
        # ``max_tokens`` is deprecated and rejected by OpenAI's reasoning models.
        out["max_completion_tokens"] = body["max_tokens"]
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("stop_sequences"):
        out["stop"] = body["stop_sequences"]
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    tools, search = options.openai_tools(body.get("tools"))
    if search is not None:
        out["web_search_options"] = search
    if tools:
        out["tools"] = tools
        choice = body.get("tool_choice") or {}
        kind = choice.get("type")
        if kind == "tool":
            out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name", "")}}
        elif kind in _TOOL_CHOICE_TO_OPENAI:
            out["tool_choice"] = _TOOL_CHOICE_TO_OPENAI[kind]
        if choice.get("disable_parallel_tool_use"):
            out["parallel_tool_calls"] = False
    user_id = (body.get("metadata") or {}).get("user_id")
    if user_id:
        out["user"] = user_id
    effort = options.effort_for_thinking(body.get("thinking"))
    fmt, config_effort = options.response_format(body.get("output_config"))
    if fmt is not None:
        out["response_format"] = fmt
    if config_effort or effort:
        out["reasoning_effort"] = config_effort or effort
    if body.get("service_tier") is not None:
        out["service_tier"] = options.tier_to_openai(body["service_tier"])
    speed = body.get("speed")
    if speed == "fast":
        out["service_tier"] = "priority"
    elif speed not in (None, "standard"):
        raise Unsupported("speed", f"{speed!r} is not standard or fast")
    return out
