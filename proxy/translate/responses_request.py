"""Request translation: an OpenAI Responses request -> a Chat Completions request.

A provider that serves only Chat Completions (an OpenAI-compatible server, or an Anthropic
model through ``chat_to_messages_request``) answers a ``/v1/responses`` call through this
mapping. The request must be self-contained: earlier turns named by ``previous_response_id``
are expanded into ``input`` items before it gets here (the stored conversation lives with the
gateway, not with the provider).

What maps: ``instructions`` (a system message first), input items of every conversational kind
(messages of each role with text, image and file parts; an earlier response's output items:
assistant text and refusals, ``function_call`` and ``function_call_output``), function tools,
``tool_choice``, ``parallel_tool_calls``, ``text.format`` / ``text.verbosity``,
``reasoning.effort``, ``max_output_tokens``, sampling, the end user's id, logprobs and
streaming. Dropped because they change nothing a client can observe from a chat provider:
``reasoning`` items of earlier turns (a chat provider takes no reasoning back) and
``reasoning.summary`` (no summary comes back, as with a model that gives none),
``metadata`` and ``store`` (the gateway keeps responses itself), ``include`` values about
hosted tools (they are refused) and encrypted reasoning, cache hints and
``max_tool_calls`` (it caps hosted tool calls only). Everything else a chat provider cannot
honour raises ``ValueError`` naming the field (``tools[2].type``, ``input[0].content[1]``), so
the endpoint answers a 400 instead of silently doing something else.
"""

from __future__ import annotations

from typing import Any

# Fields translated below, and fields a chat provider can ignore without a visible difference
_TRANSLATED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "text",
        "reasoning",
        "max_output_tokens",
        "temperature",
        "top_p",
        "top_logprobs",
        "user",
        "safety_identifier",
        "service_tier",
        "stream",
        "include",
    }
)
_HARMLESS = frozenset(
    {
        "metadata",  # gateway-side: echoed in the response, never sent to the provider
        "store",  # the gateway stores responses itself
        "previous_response_id",  # already expanded into ``input`` by the gateway
        "stream_options",  # ``include_obfuscation`` only pads events
        "truncation",  # "auto" only matters past the context window, where a 400 comes back
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "max_tool_calls",  # caps hosted tool calls, which are refused
        "background",  # false is the default; true is refused below
    }
)
# ``include`` values: the one honoured, and those about outputs a translated route never has
_LOGPROBS = "message.output_text.logprobs"
_INCLUDE_HARMLESS = frozenset(
    {
        "reasoning.encrypted_content",
        "message.input_image.image_url",
        "file_search_call.results",
        "web_search_call.results",
        "web_search_call.action.sources",
        "code_interpreter_call.outputs",
        "computer_call_output.output.image_url",
    }
)
_DETAILS = frozenset({"auto", "low", "high"})
_CHOICES = frozenset({"auto", "none", "required"})
# Input items dropped on the way to chat: an earlier turn's reasoning (chat takes none back;
# the model reasons afresh, as with a provider that keeps no reasoning between turns)
_SKIPPED_ITEMS = frozenset({"reasoning"})


def _where(path: str, message: str) -> ValueError:
    """A ValueError that names the field first, for the endpoint's 400 ``param``."""
    return ValueError(f"{path}: {message}")


def _text_part(text: str, role: str) -> dict[str, Any]:
    """A text content part as the Responses API writes it for ``role``."""
    if role == "assistant":
        return {"type": "output_text", "text": text, "annotations": []}
    return {"type": "input_text", "text": text}


def responses_input_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's ``input`` as a list of Responses input items.

    A string is one user message; messages written the short way (no ``type``, string content)
    get ``type: message`` and a list of text parts, as the API lists them in ``input_items``.
    Other items are returned as they are (the same objects: nothing is copied).
    """
    value = body.get("input")
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": [_text_part(value, "user")]}]
    if not isinstance(value, list):
        raise _where("input", "must be a string or a list of input items")
    items: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise _where(f"input[{i}]", "must be an object")
        kind = item.get("type")
        if kind is None or (kind == "message" and isinstance(item.get("content"), str)):
            if "role" not in item:
                raise _where(f"input[{i}].type", "an item without a type must be a message")
            content = item.get("content")
            role = item["role"]
            if isinstance(content, str):
                content = [_text_part(content, role if isinstance(role, str) else "user")]
            item = {**item, "type": "message", "content": content}
        items.append(item)
    return items


# --- input items -> chat messages --------------------------------------------------------------


def _image_part(part: dict[str, Any], path: str) -> dict[str, Any]:
    """``input_image`` -> a chat ``image_url`` part (an uploaded ``file_id`` has none)."""
    url = part.get("image_url")
    if not isinstance(url, str) or not url:
        raise _where(
            f"{path}.file_id" if part.get("file_id") else path,
            "only image URLs (https or data:) can be sent to this model, not uploaded file ids",
        )
    image: dict[str, Any] = {"url": url}
    if part.get("detail") in _DETAILS:
        image["detail"] = part["detail"]
    return {"type": "image_url", "image_url": image}


def _file_part(part: dict[str, Any], path: str) -> dict[str, Any]:
    """``input_file`` -> a chat ``file`` part: inline data or an uploaded file id."""
    file: dict[str, Any] = {}
    if isinstance(part.get("file_data"), str):
        file["file_data"] = part["file_data"]
        file["filename"] = part.get("filename") or "document.pdf"
    elif isinstance(part.get("file_id"), str):
        file["file_id"] = part["file_id"]
    elif part.get("file_url") is not None:
        raise _where(f"{path}.file_url", "file URLs cannot be sent to this model; send file_data")
    else:
        raise _where(path, "an input_file needs file_data or file_id")
    return {"type": "file", "file": file}


def _chat_part(part: Any, path: str) -> dict[str, Any]:
    """One Responses content part -> a chat content part."""
    if not isinstance(part, dict):
        raise _where(path, "must be a content part object")
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        text = part.get("text")
        if not isinstance(text, str):
            raise _where(f"{path}.text", "must be a string")
        return {"type": "text", "text": text}
    if kind == "refusal":
        return {"type": "refusal", "refusal": str(part.get("refusal") or "")}
    if kind == "input_image":
        return _image_part(part, path)
    if kind == "input_file":
        return _file_part(part, path)
    if kind == "input_audio":
        return {"type": "input_audio", "input_audio": part.get("input_audio")}
    raise _where(f"{path}.type", f"content type {kind!r} cannot be sent to this model")


def _chat_content(content: Any, path: str) -> Any:
    """Message content -> chat content: a string stays one, parts map one by one and a lone
    text part becomes a string (the form every OpenAI-compatible server takes)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _where(path, "must be a string or a list of content parts")
    parts = [_chat_part(p, f"{path}[{j}]") for j, p in enumerate(content)]
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _system_text(content: Any, path: str) -> str:
    """A system or developer message's text: chat takes text only there."""
    chat = _chat_content(content, path)
    if not isinstance(chat, str):
        bad = next(j for j, p in enumerate(chat) if p["type"] != "text")
        raise _where(f"{path}[{bad}].type", "system and developer messages take text only")
    return chat


def _assistant_message(content: Any, path: str) -> dict[str, Any]:
    """An earlier assistant turn: text joined; a refusal kept as a refusal part."""
    chat = _chat_content(content, path)
    if isinstance(chat, str):
        return {"role": "assistant", "content": chat}
    for j, p in enumerate(chat):
        if p["type"] not in ("text", "refusal"):
            raise _where(f"{path}[{j}].type", "assistant messages take text and refusals only")
    return {"role": "assistant", "content": chat}


class _History:
    """Chat messages built from input items in order.

    A ``function_call`` joins the assistant message just before it (chat carries an assistant
    turn's text and calls in one message). Images and files of tool outputs cannot go in a
    chat ``tool`` message, so they follow, after the run of tool messages, as a user message.
    """

    __slots__ = ("messages", "pending")

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []

    def add(self, message: dict[str, Any]) -> None:
        self.flush()
        self.messages.append(message)

    def flush(self) -> None:
        if self.pending:
            self.messages.append({"role": "user", "content": self.pending})
            self.pending = []

    def call(self, item: dict[str, Any], path: str) -> None:
        name, arguments = item.get("name"), item.get("arguments")
        call_id = item.get("call_id")
        if not isinstance(name, str) or not name:
            raise _where(f"{path}.name", "a function_call needs its function's name")
        if not isinstance(call_id, str) or not call_id:
            raise _where(f"{path}.call_id", "a function_call needs its call_id")
        if arguments is None:
            arguments = "{}"
        elif not isinstance(arguments, str):
            raise _where(f"{path}.arguments", "must be a string of JSON")
        call = {
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        last = self.messages[-1] if self.messages and not self.pending else None
        if last is not None and last["role"] == "assistant":
            calls = last.setdefault("tool_calls", [])
            calls.append(call)
            return
        self.add({"role": "assistant", "content": None, "tool_calls": [call]})

    def output(self, item: dict[str, Any], path: str) -> None:
        call_id = item.get("call_id")
        if not isinstance(call_id, str) or not call_id:
            raise _where(f"{path}.call_id", "a function_call_output needs its call_id")
        output = item.get("output")
        if output is None or isinstance(output, str):
            text = output or ""
        else:
            chat = _chat_content(output, f"{path}.output")
            if isinstance(chat, str):
                text = chat
            else:
                text = "".join(p["text"] for p in chat if p["type"] == "text")
                self.pending.extend(p for p in chat if p["type"] != "text")
        self.messages.append({"role": "tool", "tool_call_id": call_id, "content": text})


def _chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """``instructions`` and the input items as chat messages."""
    history = _History()
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _where("instructions", "must be a string")
        if instructions:
            history.add({"role": "system", "content": instructions})
    for i, item in enumerate(responses_input_items(body)):
        path = f"input[{i}]"
        kind = item.get("type")
        if kind == "message":
            role = item.get("role")
            content_path = f"{path}.content"
            if role == "user":
                history.add(
                    {"role": "user", "content": _chat_content(item.get("content"), content_path)}
                )
            elif role == "system" or role == "developer":
                # "developer" is what OpenAI's newest models call "system"; every chat server
                # knows "system", and OpenAI reads it as developer for those models
                text = _system_text(item.get("content"), content_path)
                history.add({"role": "system", "content": text})
            elif role == "assistant":
                history.add(_assistant_message(item.get("content"), content_path))
            else:
                raise _where(f"{path}.role", f"unknown role {role!r}")
        elif kind == "function_call":
            history.call(item, path)
        elif kind == "function_call_output":
            history.output(item, path)
        elif kind in _SKIPPED_ITEMS:
            continue
        elif kind == "item_reference":
            raise _where(
                f"{path}.type",
                "item references cannot be resolved for this model; "
                "send the item itself or use previous_response_id",
            )
        else:
            raise _where(f"{path}.type", f"input item type {kind!r} cannot be sent to this model")
    history.flush()
    return history.messages


# --- tools, formats and the rest ---------------------------------------------------------------


def _chat_tools(tools: Any) -> list[dict[str, Any]]:
    """Function tools, flat in Responses, nested in chat; hosted tools have no chat equivalent."""
    if not isinstance(tools, list):
        raise _where("tools", "must be a list")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise _where(f"tools[{i}]", "must be an object")
        kind = tool.get("type")
        if kind != "function":
            raise _where(
                f"tools[{i}].type",
                f"the {kind!r} tool is not available on this model; only function tools are",
            )
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise _where(f"tools[{i}].name", "a function tool needs a name")
        fn: dict[str, Any] = {"name": name}
        if tool.get("description") is not None:
            fn["description"] = tool["description"]
        fn["parameters"] = tool.get("parameters") or {"type": "object", "properties": {}}
        if tool.get("strict") is not None:
            fn["strict"] = tool["strict"]
        out.append({"type": "function", "function": fn})
    return out


def _chat_tool_choice(choice: Any) -> Any:
    """``auto`` / ``none`` / ``required`` / ``{type: function, name}`` -> chat's forms."""
    if isinstance(choice, str) and choice in _CHOICES:
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name")
        if isinstance(name, str) and name:
            return {"type": "function", "function": {"name": name}}
        raise _where("tool_choice.name", "must name a function tool")
    kind = choice.get("type") if isinstance(choice, dict) else choice
    raise _where("tool_choice", f"{kind!r} cannot be used with this model")


def _response_format(text: Any) -> tuple[dict[str, Any] | None, Any]:
    """``text`` -> (chat ``response_format`` or None for plain text, ``verbosity``)."""
    if not isinstance(text, dict):
        raise _where("text", "must be an object")
    fmt = text.get("format")
    verbosity = text.get("verbosity")
    if fmt is None:
        return None, verbosity
    if not isinstance(fmt, dict):
        raise _where("text.format", "must be an object")
    kind = fmt.get("type")
    if kind == "text":
        return None, verbosity
    if kind == "json_object":
        return {"type": "json_object"}, verbosity
    if kind == "json_schema":
        if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema"), dict):
            raise _where("text.format", "a json_schema format needs a name and a schema")
        schema = {k: fmt[k] for k in ("name", "schema", "description", "strict") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}, verbosity
    raise _where("text.format.type", f"unknown format {kind!r}")


def _check_fields(body: dict[str, Any]) -> None:
    """Refuse what a chat provider cannot honour: unknown fields and server-side features."""
    for key, value in body.items():
        if key in _TRANSLATED or value is None:
            continue
        if key in _HARMLESS:
            if key == "background" and value:
                raise _where("background", "background responses are not available on this model")
            continue
        if key == "conversation":
            raise _where(
                key, "conversations are not available on this model; use previous_response_id"
            )
        raise _where(key, "this field cannot be sent to this model")


def responses_to_chat_request(body: dict[str, Any], model: str) -> dict[str, Any]:
    """A self-contained Responses request -> a Chat Completions request for ``model``.

    Raises ``ValueError("<field>: ...")`` for anything it cannot translate (see the module
    docstring). The body is not modified; parts of it (schemas, image URLs) are shared.
    """
    _check_fields(body)
    out: dict[str, Any] = {"model": model, "messages": _chat_messages(body)}
    tools = body.get("tools")
    if tools:
        out["tools"] = _chat_tools(tools)
        if body.get("tool_choice") is not None:
            out["tool_choice"] = _chat_tool_choice(body["tool_choice"])
        if body.get("parallel_tool_calls") is not None:
            out["parallel_tool_calls"] = bool(body["parallel_tool_calls"])
    elif body.get("tool_choice") not in (None, "auto", "none"):
        raise _where("tool_choice", "names a tool but no tools are given")
    if body.get("text") is not None:
        fmt, verbosity = _response_format(body["text"])
        if fmt is not None:
            out["response_format"] = fmt
        if verbosity is not None:
            out["verbosity"] = verbosity
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise _where("reasoning", "must be an object")
        if reasoning.get("effort") is not None:
            out["reasoning_effort"] = reasoning["effort"]
    if body.get("max_output_tokens") is not None:
        out["max_completion_tokens"] = body["max_output_tokens"]
    for key in ("temperature", "top_p", "service_tier", "user", "safety_identifier"):
        if body.get(key) is not None:
            out[key] = body[key]
    include = body.get("include")
    if include is not None:
        if not isinstance(include, list):
            raise _where("include", "must be a list")
        for i, value in enumerate(include):
            if value == _LOGPROBS:
                out["logprobs"] = True
            elif value not in _INCLUDE_HARMLESS:
                raise _where(f"include[{i}]", f"{value!r} cannot be included for this model")
    if body.get("top_logprobs"):
        out["logprobs"] = True
        out["top_logprobs"] = body["top_logprobs"]
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out
