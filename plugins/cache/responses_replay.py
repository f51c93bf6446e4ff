"""The cache's canonical form for the OpenAI Responses API: assemble a stream, replay a body.

A Responses stream ends with ``response.completed`` (or ``response.incomplete``, a reply cut
by ``max_output_tokens``), which carries the whole Response object: that object is the body a
non-streaming client gets, so assembling is taking it (a stream with an ``error`` or
``response.failed`` event, or without its closing event, is never cached). Replaying takes it
apart again into the event sequence OpenAI streams, which the openai SDK's
``responses.stream`` folds back into the same Response: ``response.created`` and
``response.in_progress`` (the response in progress, no output yet), then per output item
``response.output_item.added``, its content parts or call arguments in pieces with their
``.done`` events, ``response.output_item.done``, and the closing event with the usage. Item
ids, model and ``created_at`` are the stored ones; the response id is the one ``body`` has (a
hit's own, ``proxy.responses_api.reissue``, since the stored one is its first request's). Items of other kinds (reasoning, hosted tool
calls) are replayed whole in their added and done events.
"""

from __future__ import annotations

import itertools
from typing import Any

from proxy.sse import frame_json

PIECE_CHARS = 64
_CLOSING = frozenset({"response.completed", "response.incomplete"})
_FAILED = frozenset({"response.failed", "error"})


class ResponsesAssembler:
    """The Response of a streamed reply: the closing event's ``response``."""

    __slots__ = ("_failed", "_response")

    def __init__(self) -> None:
        self._response: dict[str, Any] | None = None
        self._failed = False

    def feed(self, name: str | None, data: dict[str, Any]) -> None:
        kind = name or data.get("type")
        if kind in _CLOSING:
            response = data.get("response")
            self._response = response if isinstance(response, dict) else None
        elif kind in _FAILED:
            self._failed = True

    def result(self) -> dict[str, Any] | None:
        if self._failed or self._response is None:
            return None
        return self._response


def _pieces(text: str) -> list[str]:
    return [text[i : i + PIECE_CHARS] for i in range(0, len(text), PIECE_CHARS)] or [""]


def replay_responses(body: dict[str, Any]) -> list[bytes]:
    """The ready SSE frames of a valid Responses stream of the whole Response ``body``."""
    seq = itertools.count()
    out: list[bytes] = []

    def ev(kind: str, **fields: Any) -> None:
        fields["type"] = kind
        fields["sequence_number"] = next(seq)
        out.append(frame_json(fields, kind))

    start = {**body, "status": "in_progress", "output": [], "usage": None}
    start["incomplete_details"] = None
    start.pop("completed_at", None)
    ev("response.created", response=start)
    ev("response.in_progress", response=start)
    for index, item in enumerate(body.get("output") or ()):
        kind = item.get("type")
        if kind == "message":
            _message(ev, index, item)
        elif kind == "function_call":
            _call(ev, index, item)
        else:
            ev("response.output_item.added", output_index=index, item=item)
        ev("response.output_item.done", output_index=index, item=item)
    closing = "response.incomplete" if body.get("status") == "incomplete" else "response.completed"
    ev(closing, response=body)
    return out


def _message(ev: Any, index: int, item: dict[str, Any]) -> None:
    ev(
        "response.output_item.added",
        output_index=index,
        item={**item, "status": "in_progress", "content": []},
    )
    at = {"item_id": item.get("id"), "output_index": index}
    for ci, part in enumerate(item.get("content") or ()):
        if part.get("type") == "refusal":
            refusal = part.get("refusal") or ""
            ev("response.content_part.added", **at, content_index=ci, part={**part, "refusal": ""})
            for piece in _pieces(refusal):
                ev("response.refusal.delta", **at, content_index=ci, delta=piece)
            ev("response.refusal.done", **at, content_index=ci, refusal=refusal)
        else:
            text = part.get("text") or ""
            logprobs = part.get("logprobs") or []
            opening = {**part, "text": "", "logprobs": []}
            ev("response.content_part.added", **at, content_index=ci, part=opening)
            for piece in _pieces(text):
                ev("response.output_text.delta", **at, content_index=ci, delta=piece, logprobs=[])
            ev("response.output_text.done", **at, content_index=ci, text=text, logprobs=logprobs)
        ev("response.content_part.done", **at, content_index=ci, part=part)


def _call(ev: Any, index: int, item: dict[str, Any]) -> None:
    arguments = item.get("arguments") or ""
    opening = {**item, "status": "in_progress", "arguments": ""}
    ev("response.output_item.added", output_index=index, item=opening)
    at = {"item_id": item.get("id"), "output_index": index}
    for piece in _pieces(arguments):
        ev("response.function_call_arguments.delta", **at, delta=piece)
    ev("response.function_call_arguments.done", **at, arguments=arguments)
