"""Stream translation both ways: Anthropic SSE events <-> OpenAI ``chat.completion.chunk``.

This runs once per stream event, so it keeps per-event work small: stream translators are
stateful objects fed one event at a time, building only the dicts they emit. An upstream
``error`` event is raised as ``StreamError`` for the relay to render.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from proxy.context import Usage
from proxy.tokens import Tokens, openai_tokens, read_anthropic_event
from proxy.translate.common import (
    _chat_usage,
    _message_start,
    chat_finish_to_stop,
    stop_to_chat_finish,
)


class StreamError(Exception):
    """An ``error`` event inside an upstream stream; the handler renders it for the client."""

    def __init__(self, message: str, type: str = "api_error") -> None:
        super().__init__(message)
        self.message = message
        self.type = type


def _event(name: str, **fields: Any) -> tuple[str, dict[str, Any]]:
    """An Anthropic SSE event: the event name repeats as the data's ``type``."""
    fields["type"] = name
    return (name, fields)


class MessagesStreamToChat:
    """Anthropic SSE events -> OpenAI ``chat.completion.chunk`` dicts.

    Anthropic numbers content blocks (text and tool_use alike); OpenAI numbers tool calls only,
    from 0, so block indexes are remapped. ``usage`` is (input, output) tokens seen so far.
    """

    __slots__ = ("_counts", "_id", "_tools", "created", "include_usage", "model", "usage")

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time())
        self._id = f"chatcmpl-{uuid.uuid4().hex}"
        self._tools: dict[int, int] = {}
        self._counts = Usage()  # what proxy.tokens reads the events into
        self.usage: Tokens = (0, 0)

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
            counts = self._counts
            if read_anthropic_event(kind, data, counts):
                self.usage = (counts.input_tokens, counts.output_tokens)
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "message_delta":
            counts = self._counts
            if read_anthropic_event(kind, data, counts):
                self.usage = (counts.input_tokens, counts.output_tokens)
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
        self.usage: Tokens = (0, 0)
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
        if usage:  # null on every chunk but the last: a truth test is the cheapest
            self.usage = openai_tokens(usage)
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
