"""Pure translation between OpenAI Chat Completions and Anthropic Messages, both ways.

The gateway lets an OpenAI SDK client call a Claude model and an Anthropic SDK client call an
OpenAI model, so requests, whole responses and stream events all need a faithful mapping that
the official SDKs parse. This module does no I/O and keeps per-event work small: stream
translators are stateful objects fed one event at a time, building only the dicts they emit
(no deep copies, no JSON round trips except tool arguments, which one side keeps as a string).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

DEFAULT_MAX_TOKENS = 4096

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
_TOOL_CHOICE_TO_ANTHROPIC = {"auto": "auto", "none": "none", "required": "any"}
_TOOL_CHOICE_TO_OPENAI = {"auto": "auto", "none": "none", "any": "required"}


class StreamError(Exception):
    """An ``error`` event inside an upstream stream; the handler renders it for the client."""

    def __init__(self, message: str, type: str = "api_error") -> None:
        super().__init__(message)
        self.message = message
        self.type = type


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


def _event(name: str, **fields: Any) -> tuple[str, dict[str, Any]]:
    """An Anthropic SSE event: the event name repeats as the data's ``type``."""
    fields["type"] = name
    return (name, fields)


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
    """One OpenAI content part -> an Anthropic content block (``None`` if it has no equivalent)."""
    kind = part.get("type")
    if kind == "text" or kind == "refusal":
        text = part.get("text") if kind == "text" else part.get("refusal")
        return {"type": "text", "text": text} if text else None
    if kind == "image_url":
        url = (part.get("image_url") or {}).get("url", "")
        source = _data_url_source(url) or {"type": "url", "url": url}
        return {"type": "image", "source": source}
    if kind == "file":
        data = _data_url_source((part.get("file") or {}).get("file_data", ""))
        return {"type": "document", "source": data} if data else None
    return None


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


def _tool_choice_to_anthropic(choice: Any, parallel: Any) -> dict[str, Any] | None:
    """OpenAI ``tool_choice`` (+ ``parallel_tool_calls``) -> Anthropic ``tool_choice``."""
    out: dict[str, Any] | None
    if isinstance(choice, str):
        out = {"type": _TOOL_CHOICE_TO_ANTHROPIC.get(choice, "auto")}
    elif isinstance(choice, dict):
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
    """OpenAI chat request -> Anthropic Messages request; fields Anthropic rejects are dropped."""
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

    out: dict[str, Any] = {"model": upstream_model, "messages": messages}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
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
    tools = [
        {
            "name": fn.get("name", ""),
            "description": fn.get("description", ""),
            "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
        }
        for t in body.get("tools") or ()
        if t.get("type", "function") == "function" and (fn := t.get("function") or {})
    ]
    if tools:
        out["tools"] = tools
        choice = _tool_choice_to_anthropic(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice:
            out["tool_choice"] = choice
    if body.get("user"):
        out["metadata"] = {"user_id": body["user"]}
    return out


# --- Anthropic response -> OpenAI response -----------------------------------------------------


def _anthropic_prompt_tokens(usage: dict[str, Any]) -> int:
    """OpenAI counts cached prompt tokens in ``prompt_tokens``; Anthropic reports them apart."""
    return (
        (usage.get("input_tokens") or 0)
        + (usage.get("cache_read_input_tokens") or 0)
        + (usage.get("cache_creation_input_tokens") or 0)
    )


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


def messages_response_to_chat(resp: dict[str, Any], model: str) -> dict[str, Any]:
    """Anthropic message -> OpenAI ``chat.completion`` (one choice)."""
    message = _assistant_turn(resp.get("content"))
    if message["content"] is None and "tool_calls" not in message:
        message["content"] = ""
    message["refusal"] = None
    finish = stop_to_chat_finish(resp.get("stop_reason")) or "stop"
    usage = resp.get("usage") or {}
    prompt, cached = _anthropic_prompt_tokens(usage), usage.get("cache_read_input_tokens")
    return {
        "id": resp.get("id") or f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": _chat_usage(prompt, usage.get("output_tokens") or 0, cached),
    }


# --- Anthropic request -> OpenAI request -------------------------------------------------------


def _anthropic_block_to_part(block: dict[str, Any]) -> dict[str, Any] | None:
    """One Anthropic text/image/document block -> an OpenAI content part (``None`` if none)."""
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
    return None


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
                parts.extend(
                    p
                    for b in result
                    if b.get("type") != "text" and (p := _anthropic_block_to_part(b))
                )
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": block.get("tool_use_id", ""),
                    "content": _text_of(result),
                }
            )
        elif part := _anthropic_block_to_part(block):
            parts.append(part)
    if parts:
        out.append({"role": "user", "content": _parts_content(parts)})


def messages_to_chat_request(body: dict[str, Any], upstream_model: str) -> dict[str, Any]:
    """Anthropic Messages request -> OpenAI chat request (``thinking``/``top_k`` are dropped)."""
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
    tools = [
        {
            "type": "function",
            "function": {
                "name": t.get("name", ""),
                "description": t.get("description", ""),
                "parameters": t.get("input_schema") or {"type": "object", "properties": {}},
            },
        }
        for t in body.get("tools") or ()
        if t.get("type", "custom") == "custom"
    ]
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
    return out


# --- OpenAI response -> Anthropic response -----------------------------------------------------


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
    usage = resp.get("usage") or {}
    out["usage"] = {
        "input_tokens": usage.get("prompt_tokens") or 0,
        "output_tokens": usage.get("completion_tokens") or 0,
    }
    return out


# --- Streams -----------------------------------------------------------------------------------


class MessagesStreamToChat:
    """Anthropic SSE events -> OpenAI ``chat.completion.chunk`` dicts.

    Anthropic numbers content blocks (text and tool_use alike); OpenAI numbers tool calls only,
    from 0, so block indexes are remapped. ``usage`` is (input, output) tokens seen so far.
    """

    __slots__ = ("_id", "_tools", "created", "include_usage", "model", "usage")

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time())
        self._id = f"chatcmpl-{uuid.uuid4().hex}"
        self._tools: dict[int, int] = {}
        self.usage: tuple[int, int] = (0, 0)

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        """A one-choice chunk; ``usage: null`` mirrors OpenAI when usage was requested."""
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        chunk: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def feed(self, event: str | None, data: dict[str, Any]) -> list[dict[str, Any]]:
        """Translate one event; returns the chunks to send (often one, sometimes none)."""
        kind = data.get("type") or event
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            dkind = delta.get("type")
            if dkind == "text_delta":
                return [self._chunk({"content": delta.get("text", "")})]
            if dkind == "input_json_delta":
                partial = delta.get("partial_json")
                tool = self._tools.get(data.get("index", 0))
                if not partial or tool is None:
                    return []
                call = {"index": tool, "function": {"arguments": partial}}
                return [self._chunk({"tool_calls": [call]})]
            return []
        if kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                tool = self._tools[data.get("index", 0)] = len(self._tools)
                call = {
                    "index": tool,
                    "id": block.get("id", ""),
                    "type": "function",
                    "function": {"name": block.get("name", ""), "arguments": ""},
                }
                return [self._chunk({"tool_calls": [call]})]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            return []
        if kind == "message_start":
            message = data.get("message") or {}
            if message.get("id"):
                self._id = message["id"]
            usage = message.get("usage") or {}
            self.usage = (_anthropic_prompt_tokens(usage), usage.get("output_tokens") or 0)
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "message_delta":
            usage = data.get("usage") or {}
            prompt = self.usage[0]
            if usage.get("input_tokens") is not None:
                prompt = _anthropic_prompt_tokens(usage)
            self.usage = (prompt, usage.get("output_tokens") or self.usage[1])
            finish = stop_to_chat_finish((data.get("delta") or {}).get("stop_reason")) or "stop"
            return [self._chunk({}, finish)]
        if kind == "message_stop":
            if not self.include_usage:
                return []
            chunk = self._chunk({})
            chunk["choices"] = []
            chunk["usage"] = _chat_usage(*self.usage)
            return [chunk]
        if kind == "error":
            error = data.get("error") or {}
            message = error.get("message", "upstream stream error")
            raise StreamError(message, error.get("type", "api_error"))
        return []  # ping, content_block_stop, thinking blocks, unknown future events


class ChatStreamToMessages:
    """OpenAI ``chat.completion.chunk`` dicts -> Anthropic SSE events ``(name, data)``.

    OpenAI has no block boundaries, so blocks open when a new kind of delta (text, or a new tool
    call index) arrives and close when another starts or the stream ends. Usage arrives last in
    OpenAI streams, so input tokens are reported in ``message_delta`` rather than at the start.
    """

    __slots__ = ("_finish", "_next", "_open", "_open_text", "_started", "_tools", "model", "usage")

    def __init__(self, model: str) -> None:
        self.model = model
        self.usage: tuple[int, int] = (0, 0)
        self._started = False
        self._next = 0  # index of the next Anthropic content block
        self._open: int | None = None  # index of the open content block, if any
        self._open_text = False  # whether that block is a text block
        self._tools: dict[int, int] = {}  # OpenAI tool call index -> Anthropic block index
        self._finish: str | None = None

    def _start(self, msg_id: str | None) -> tuple[str, dict[str, Any]]:
        """The ``message_start`` event; usage is unknown yet (OpenAI reports it at the end)."""
        self._started = True
        message = _message_start(msg_id or f"msg_{uuid.uuid4().hex}", self.model)
        return _event("message_start", message=message)

    def _open_block(self, events: list[tuple[str, dict[str, Any]]], block: dict[str, Any]) -> int:
        """Close the open block (Anthropic streams one block at a time) and start ``block``."""
        self._open_text = block["type"] == "text"
        if self._open is not None:
            events.append(_event("content_block_stop", index=self._open))
        index = self._open = self._next
        self._next += 1
        events.append(_event("content_block_start", index=index, content_block=block))
        return index

    def feed(self, chunk: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """Translate one chunk; returns the events to send (none for usage-only chunks)."""
        events: list[tuple[str, dict[str, Any]]] = []
        if not self._started:
            events.append(self._start(chunk.get("id")))
        usage = chunk.get("usage")
        if usage:
            self.usage = (usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0)
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content") or delta.get("refusal")
            if text:
                index = self._open
                if index is None or not self._open_text:
                    index = self._open_block(events, {"type": "text", "text": ""})
                delta = {"type": "text_delta", "text": text}
                events.append(_event("content_block_delta", index=index, delta=delta))
            for call in delta.get("tool_calls") or ():
                self._tool_delta(events, call)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return events

    def _tool_delta(self, events: list[tuple[str, dict[str, Any]]], call: dict[str, Any]) -> None:
        """A new OpenAI tool call index opens a tool_use block; argument text streams into it."""
        tool = call.get("index", 0)
        index = self._tools.get(tool)
        if index is None:
            block = {"type": "tool_use", "id": call.get("id") or f"toolu_{uuid.uuid4().hex}"}
            block["name"] = (call.get("function") or {}).get("name") or ""
            block["input"] = {}
            index = self._tools[tool] = self._open_block(events, block)
        arguments = (call.get("function") or {}).get("arguments")
        if arguments:
            delta = {"type": "input_json_delta", "partial_json": arguments}
            events.append(_event("content_block_delta", index=index, delta=delta))

    def finish(self) -> list[tuple[str, dict[str, Any]]]:
        """Close the message once the OpenAI stream has ended (``[DONE]`` or end of body)."""
        events: list[tuple[str, dict[str, Any]]] = []
        if not self._started:
            events.append(self._start(None))
        if self._open is not None:
            events.append(_event("content_block_stop", index=self._open))
            self._open = None
        reason = self._finish
        if self._tools and reason in (None, "stop"):
            reason = "tool_calls"
        delta = {"stop_reason": chat_finish_to_stop(reason) or "end_turn", "stop_sequence": None}
        usage = {"input_tokens": self.usage[0], "output_tokens": self.usage[1]}
        events.append(_event("message_delta", delta=delta, usage=usage))
        events.append(_event("message_stop"))
        return events
