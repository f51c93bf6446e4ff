"""Stream translation: ``chat.completion.chunk`` dicts -> OpenAI Responses stream events.

The Responses stream is typed and nested where chat's is flat: ``response.created`` and
``response.in_progress``, then per output item ``response.output_item.added``, per content
part ``response.content_part.added``, the deltas (``response.output_text.delta``,
``response.refusal.delta``, ``response.function_call_arguments.delta``), their ``.done``
events closing each level, and ``response.completed`` (or ``response.incomplete``) with the
whole response and its usage. Every event carries ``sequence_number``, from 0.

Chat has no item boundaries, so an item opens when a new kind of delta arrives (text after
tool calls opens a second message item) and closes when another opens or the stream ends:
output items stream one at a time, as OpenAI's do. This runs once per chunk: it builds only
the events it emits and keeps the texts as lists of pieces, joined once per part.
"""

from __future__ import annotations

from typing import Any

from proxy.tokens import Tokens, openai_tokens
from proxy.translate.responses_output import (
    call_item_id,
    chat_logprobs,
    finish_status,
    message_id,
    response_skeleton,
    responses_usage,
)

Event = tuple[str, dict[str, Any]]

# ``error.code`` values of a failed Response that the SDK knows and that a gateway can mean;
# any other code (the gateway's own, a provider's) is reported as a server error
_FAIL_CODES = frozenset({"server_error", "rate_limit_exceeded", "invalid_prompt"})


class _Part:
    """An open content part: ``output_text`` or ``refusal``, its text pieces and logprobs."""

    __slots__ = ("index", "kind", "logprobs", "pieces")

    def __init__(self, kind: str, index: int) -> None:
        self.kind = kind
        self.index = index
        self.pieces: list[str] = []
        self.logprobs: list[dict[str, Any]] = []

    def final(self) -> dict[str, Any]:
        text = "".join(self.pieces)
        if self.kind == "refusal":
            return {"type": "refusal", "refusal": text}
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": self.logprobs}


class ChatStreamToResponses:
    """Chat chunks -> Responses ``(event type, data)`` pairs, in the order the SDK expects.

    ``usage`` is ``(input, output)`` once the chat stream reported it (``None`` before);
    ``response`` is the final Response object once ``finish()`` (or ``fail()``) ran.
    """

    __slots__ = (
        "_calls",
        "_finish",
        "_index",
        "_item",
        "_messages",
        "_part",
        "_parts",
        "_pieces",
        "_response",
        "_seq",
        "_started",
        "_usage",
        "response",
        "usage",
    )

    def __init__(
        self, request: dict[str, Any], response_id: str, model: str, created_at: int
    ) -> None:
        self._response = response_skeleton(request, response_id, model, created_at)
        self._seq = 0
        self._started = False
        self._item: dict[str, Any] | None = None  # the open output item
        self._index = -1  # its output index
        self._pieces: list[str] = []  # the arguments of an open function_call item
        self._part: _Part | None = None  # the open content part of an open message item
        self._parts: list[dict[str, Any]] = []  # closed parts of the open message item
        self._messages = 0  # message items opened, for their ids
        self._calls: dict[int, tuple[int, dict[str, Any], list[str]]] = {}
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self.usage: Tokens | None = None
        self.response: dict[str, Any] | None = None

    # --- events ----------------------------------------------------------------------------

    def _emit(self, events: list[Event], kind: str, data: dict[str, Any]) -> None:
        data["type"] = kind
        data["sequence_number"] = self._seq
        self._seq += 1
        events.append((kind, data))

    def _lifecycle(self, events: list[Event], kind: str) -> None:
        """``response.created`` and friends carry the response as it is at that moment."""
        snapshot = dict(self._response)
        snapshot["output"] = list(snapshot["output"])
        self._emit(events, kind, {"response": snapshot})

    def _start(self, events: list[Event]) -> None:
        self._started = True
        self._lifecycle(events, "response.created")
        self._lifecycle(events, "response.in_progress")

    # --- items -----------------------------------------------------------------------------

    def _open(self, events: list[Event], item: dict[str, Any]) -> int:
        """Close the open item and add ``item`` (in progress) at the next output index."""
        self._close(events, "completed")
        output = self._response["output"]
        index = len(output)
        output.append(item)
        self._item = item
        self._index = index
        added = dict(item)
        if item["type"] == "message":
            added["content"] = []
        self._emit(events, "response.output_item.added", {"output_index": index, "item": added})
        return index

    def _close_part(self, events: list[Event], item: dict[str, Any], index: int) -> None:
        part = self._part
        if part is None:
            return
        self._part = None
        final = part.final()
        where = {"item_id": item["id"], "output_index": index, "content_index": part.index}
        if part.kind == "refusal":
            done = {**where, "refusal": final["refusal"]}
            self._emit(events, "response.refusal.done", done)
        else:
            done = {**where, "text": final["text"], "logprobs": part.logprobs}
            self._emit(events, "response.output_text.done", done)
        self._parts.append(final)
        self._emit(events, "response.content_part.done", {**where, "part": final})

    def _close(self, events: list[Event], status: str) -> None:
        """Close the open item (its open part first) with ``status``."""
        item = self._item
        if item is None:
            return
        self._item = None
        index = self._index
        if item["type"] == "message":
            self._close_part(events, item, index)
            item["content"] = self._parts
            self._parts = []
        else:
            item["arguments"] = "".join(self._pieces)
            done = {"item_id": item["id"], "output_index": index, "name": item["name"]}
            done["arguments"] = item["arguments"]
            self._emit(events, "response.function_call_arguments.done", done)
        item["status"] = status
        self._emit(events, "response.output_item.done", {"output_index": index, "item": item})

    def _text(self, events: list[Event], kind: str, text: str, logprobs: Any) -> None:
        """A text or refusal delta: into the open message item, opening what is needed."""
        item = self._item
        if item is None or item["type"] != "message":
            item_id = message_id(self._response["id"], self._messages)
            self._messages += 1
            message = {
                "id": item_id,
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            self._open(events, message)
            item = message
        index = self._index
        part = self._part
        where = {"item_id": item["id"], "output_index": index}
        if part is None or part.kind != kind:
            self._close_part(events, item, index)
            part = self._part = _Part(kind, len(self._parts))
            empty = (
                {"type": "refusal", "refusal": ""}
                if kind == "refusal"
                else {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            )
            added = {**where, "content_index": part.index, "part": empty}
            self._emit(events, "response.content_part.added", added)
        part.pieces.append(text)
        where["content_index"] = part.index
        if kind == "refusal":
            self._emit(events, "response.refusal.delta", {**where, "delta": text})
            return
        lp = chat_logprobs(logprobs) if logprobs else []
        part.logprobs.extend(lp)
        self._emit(events, "response.output_text.delta", {**where, "delta": text, "logprobs": lp})

    def _call(self, events: list[Event], call: dict[str, Any]) -> None:
        """A tool-call delta: a new chat index opens a ``function_call`` item."""
        fn = call.get("function") or {}
        key = call.get("index", 0)
        entry = self._calls.get(key)
        if entry is None:
            item_id = call_item_id(self._response["id"], len(self._calls))
            item = {
                "id": item_id,
                "type": "function_call",
                "status": "in_progress",
                "arguments": "",
                "call_id": call.get("id") or item_id,
                "name": fn.get("name") or "",
            }
            entry = self._calls[key] = (self._open(events, item), item, [])
            self._pieces = entry[2]
        arguments = fn.get("arguments")
        if arguments:
            index, item, pieces = entry
            pieces.append(arguments)
            if item is not self._item:  # a late delta (never from OpenAI): keep it whole
                item["arguments"] = "".join(pieces)
            delta = {"item_id": item["id"], "output_index": index, "delta": arguments}
            self._emit(events, "response.function_call_arguments.delta", delta)

    # --- the stream ------------------------------------------------------------------------

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        """Translate one chat chunk; returns the events to send (none for a usage chunk)."""
        events: list[Event] = []
        if not self._started:
            self._start(events)
        usage = chunk.get("usage")
        if usage:  # null on every chunk but the last: a truth test is the cheapest
            self._usage = usage
            self.usage = openai_tokens(usage)
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                self._text(events, "output_text", text, choice.get("logprobs"))
            refusal = delta.get("refusal")
            if refusal:
                self._text(events, "refusal", refusal, None)
            for call in delta.get("tool_calls") or ():
                self._call(events, call)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return events

    def finish(self) -> list[Event]:
        """Close the response once the chat stream has ended (``[DONE]`` or end of body):
        the open item, then ``response.completed`` (``response.incomplete`` when the reply
        was cut by the token limit or a content filter) with the usage."""
        events: list[Event] = []
        if not self._started:
            self._start(events)
        response = self._response
        status = finish_status(response, self._finish)
        self._close(events, status)
        if self._usage is not None:
            response["usage"] = responses_usage(self._usage)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        self._emit(events, kind, {"response": response})
        self.response = response
        return events

    def fail(self, message: str, code: str = "server_error") -> list[Event]:
        """End the response as ``failed`` (the provider's stream broke or sent an error):
        the open item closes as incomplete and ``response.failed`` carries the error (a
        ``code`` OpenAI does not use becomes ``server_error``; the message says what broke)."""
        events: list[Event] = []
        if not self._started:
            self._start(events)
        response = self._response
        self._close(events, "incomplete")
        response["status"] = "failed"
        code = code if code in _FAIL_CODES else "server_error"
        response["error"] = {"code": code, "message": message}
        if self._usage is not None:
            response["usage"] = responses_usage(self._usage)
        self._emit(events, "response.failed", {"response": response})
        self.response = response
        return events
