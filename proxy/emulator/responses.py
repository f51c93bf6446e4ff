"""The OpenAI Responses API: ``POST /v1/responses`` (whole and as SSE), stored responses.

A reply is built once as the whole Response object; a stream is that object taken apart into
the event sequence OpenAI sends (``response.created``, ``response.in_progress``, per output
item ``output_item.added`` / content deltas / ``output_item.done``, then
``response.completed`` or ``response.incomplete`` carrying the usage), each with an
``event:`` line and a ``sequence_number``. With ``store`` (the default) the response is kept,
bounded, for ``GET``/``DELETE /v1/responses/{id}``, ``GET .../input_items`` and for a later
request's ``previous_response_id``, which continues that conversation (an unknown id is a 404,
as the API answers). ``POST /v1/responses/input_tokens`` counts a request's input as the
response would report it (``_input_tokens``), so a count predicts the usage that follows.

The reply follows the emulator's rules: the echo of the last user message, function calls
by the rule of ``tools`` (``tool_choice``, parallel calls), JSON fitting the schema
for ``text.format`` ``json_schema``, a ``web_search_call`` item before the answer when a web
search tool is offered, and ``status: incomplete`` when ``max_output_tokens`` cuts it short.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from typing import Any

import orjson
from aiohttp import web

from proxy.emulator.controls import _Controls, _stream
from proxy.emulator.items import (
    check_tools,
    input_items,
    item_text,
    last_user_text,
    stored_item,
    text_format,
)
from proxy.emulator.prompts import _model, _positive
from proxy.emulator.replies import _count, _pieces, _reply, _split
from proxy.emulator.schema import schema_instance
from proxy.emulator.state import _State
from proxy.emulator.tools import responses_calls
from proxy.emulator.wire import Json, _BadRequest, _json

_STORED_MAX = 10_000  # responses kept for retrieval; the oldest go first
_MIN_OUTPUT_TOKENS = 16  # the API's lower bound on max_output_tokens


class _Stored:
    """A kept response: the object, its own input items (with ids) and the whole conversation
    a follow-up continues (earlier turns, this input, this output)."""

    __slots__ = ("conversation", "input", "response")

    def __init__(self, response: Json, input: list[Json], conversation: list[Json]) -> None:
        self.response = response
        self.input = input
        self.conversation = conversation


def _usage(input_tokens: int, output_tokens: int) -> Json:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def _input_tokens(instructions: str | None, conversation: list[Json]) -> int:
    """A request's input tokens: the words of ``instructions`` and of every item of the
    conversation (earlier turns included), at least 1; a response's usage and a count agree."""
    words = len((instructions or "").split())
    return max(1, words + sum(len(item_text(i).split()) for i in conversation))


def _instructions(body: Json) -> str | None:
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _BadRequest("Invalid type for 'instructions': expected a string.", "instructions")
    return instructions


# the fields of a count (the API's InputTokenCountParams); any other is an unknown parameter
_COUNT_FIELDS = frozenset(
    {
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "reasoning",
        "text",
        "truncation",
        "conversation",
        "previous_response_id",
        "personality",
    }
)


def _flag(body: Json, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise _BadRequest(f"Invalid type for '{name}': expected a boolean.", name)
    return value


class _ResponsesEndpoint(_State):
    """``/v1/responses`` and the stored responses behind ``/v1/responses/{id}``."""

    def __init__(self, api_key: str | None) -> None:
        super().__init__(api_key)
        self.stored: OrderedDict[str, _Stored] = OrderedDict()

    def _previous(self, body: Json) -> list[Json]:
        """The conversation ``previous_response_id`` continues (empty without one)."""
        prev = body.get("previous_response_id")
        if prev is None:
            return []
        if not isinstance(prev, str):
            raise _BadRequest(
                "Invalid type for 'previous_response_id': expected a string.",
                "previous_response_id",
            )
        kept = self.stored.get(prev)
        if kept is None:
            raise _BadRequest(
                f"Previous response with id '{prev}' not found.", "previous_response_id", 404
            )
        return kept.conversation

    async def responses(
        self, request: web.Request, body: Json, ctl: _Controls
    ) -> web.StreamResponse:
        """Create a response, whole or streamed; see the module docstring for the reply."""
        model, items = _model(body), input_items(body)
        history = self._previous(body)
        if not items and not history:
            raise _BadRequest("Missing required parameter: 'input'.", "input")
        instructions = _instructions(body)
        limit = _positive(body, "max_output_tokens")
        if limit is not None and limit < _MIN_OUTPUT_TOKENS:
            raise _BadRequest(
                "Invalid 'max_output_tokens': integer below minimum value. Expected a value >= "
                f"{_MIN_OUTPUT_TOKENS}, but got {limit} instead.",
                "max_output_tokens",
            )
        store = _flag(body, "store", True)
        stream = _flag(body, "stream", False)
        fmt = text_format(body)
        search = check_tools(body)
        conversation = [*history, *items]
        user_text = last_user_text(conversation)
        input_tokens = _input_tokens(instructions, conversation)
        output, output_tokens, cut = self._output(body, conversation, user_text, fmt, search, ctl)
        rid = self.new_id("resp_")
        response = self._response(rid, body, model, output, fmt, store, cut)
        response["usage"] = _usage(input_tokens, output_tokens)
        if store:
            own = [stored_item(i, self.new_id) for i in items]
            self._keep(rid, _Stored(response, own, [*conversation, *output]))
        if not stream:
            return _json(response)
        return await _stream(request, _events(response, output), ctl)

    async def input_tokens(self, request: web.Request, body: Json, ctl: _Controls) -> web.Response:
        """The input token count of a Responses request, every field optional as in the API:
        ``{"object": "response.input_tokens", "input_tokens": n}``, what the response would
        report as its ``usage.input_tokens``. A field a count does not take is refused."""
        for key in body:
            if key not in _COUNT_FIELDS:
                raise _BadRequest(f"Unknown parameter: '{key}'.", key)
        model = body.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise _BadRequest("Invalid type for 'model': expected a string.", "model")
        if body.get("conversation") is not None and body.get("previous_response_id") is not None:
            raise _BadRequest(
                "Mutually exclusive parameters: Ensure you are only providing one of: "
                "'previous_response_id' or 'conversation'.",
                "conversation",
            )
        items, history = input_items(body), self._previous(body)
        instructions = _instructions(body)
        check_tools(body)
        text_format(body)
        counted = _input_tokens(instructions, [*history, *items])
        return _json({"object": "response.input_tokens", "input_tokens": counted})

    def _output(
        self,
        body: Json,
        conversation: list[Json],
        user_text: str,
        fmt: Json,
        search: bool,
        ctl: _Controls,
    ) -> tuple[list[Json], int, bool]:
        """The output items, the output tokens, and whether max_output_tokens cut the reply."""
        output: list[Json] = []
        last = conversation[-1]
        user_turn = last.get("type", "message") == "message" and last.get("role") == "user"
        calls = responses_calls(body, user_turn, user_text)
        for name, arguments in calls:
            call: Json = dict(id=self.new_id("fc_"), type="function_call", status="completed")
            call.update(arguments=arguments, call_id=self.new_id("call_"), name=name)
            output.append(call)
        if calls:
            return output, sum(_count(arguments) for _, arguments in calls), False
        if search and user_turn:
            action = {"type": "search", "query": user_text}
            output.append(
                dict(
                    id=self.new_id("ws_"), type="web_search_call", status="completed", action=action
                )
            )
        cut = False
        if fmt["type"] == "text":
            words, cut = _reply(user_text, ctl.words, _positive(body, "max_output_tokens"))
            text, tokens = " ".join(words), len(words)
        else:
            echo = " ".join(_reply(user_text, ctl.words, None)[0])
            value = schema_instance(fmt["schema"], echo) if fmt["type"] == "json_schema" else None
            text = orjson.dumps({"echo": echo} if value is None else value).decode()
            tokens = _count(text)
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
        message: Json = dict(id=self.new_id("msg_"), type="message", role="assistant")
        message.update(status="incomplete" if cut else "completed", content=[part])
        output.append(message)
        return output, tokens, cut

    @staticmethod
    def _response(
        rid: str, body: Json, model: str, output: list[Json], fmt: Json, store: bool, cut: bool
    ) -> Json:
        get = body.get
        return {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "status": "incomplete" if cut else "completed",
            "background": False,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "instructions": get("instructions"),
            "max_output_tokens": get("max_output_tokens"),
            "max_tool_calls": get("max_tool_calls"),
            "model": model,
            "output": output,
            "parallel_tool_calls": get("parallel_tool_calls", True),
            "previous_response_id": get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "safety_identifier": get("safety_identifier"),
            "service_tier": "default",
            "store": store,
            "temperature": get("temperature", 1.0),
            "text": {"format": fmt, "verbosity": "medium"},
            "tool_choice": get("tool_choice", "auto"),
            "tools": get("tools") or [],
            "top_logprobs": 0,
            "top_p": get("top_p", 1.0),
            "truncation": get("truncation", "disabled"),
            "usage": None,
            "user": get("user"),
            "metadata": get("metadata") or {},
        }

    def _keep(self, rid: str, stored: _Stored) -> None:
        self.stored[rid] = stored
        while len(self.stored) > _STORED_MAX:
            self.stored.popitem(last=False)

    def _kept(self, request: web.Request) -> tuple[str, _Stored]:
        rid = request.match_info["id"]
        kept = self.stored.get(rid)
        if kept is None:
            raise _BadRequest(f"Response with id '{rid}' not found.", None, 404)
        return rid, kept

    async def get_response(self, request: web.Request, body: Json, ctl: _Controls) -> web.Response:
        return _json(self._kept(request)[1].response)

    async def delete_response(
        self, request: web.Request, body: Json, ctl: _Controls
    ) -> web.Response:
        rid, _ = self._kept(request)
        del self.stored[rid]
        return _json({"id": rid, "object": "response", "deleted": True})

    async def input_items(self, request: web.Request, body: Json, ctl: _Controls) -> web.Response:
        """The response's own input items, a page at a time (``limit``, ``order``, ``after``)."""
        _, kept = self._kept(request)
        query = request.query
        try:
            limit = int(query.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            raise _BadRequest("Invalid 'limit': expected an integer from 1 to 100.", "limit")
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise _BadRequest("Invalid 'order': expected 'asc' or 'desc'.", "order")
        items = kept.input if order == "asc" else kept.input[::-1]
        start = 0
        after = query.get("after")
        if after is not None:
            ids = [i.get("id") for i in items]
            if after not in ids:
                raise _BadRequest(f"Invalid 'after': no input item with id '{after}'.", "after")
            start = ids.index(after) + 1
        page = items[start : start + limit]
        return _json(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": start + limit < len(items),
            }
        )


def _events(response: Json, output: list[Json]) -> list[bytes]:
    """The SSE events of a response, in the order and shapes the API streams them."""
    seq = itertools.count()

    def ev(kind: str, **fields: Any) -> bytes:
        fields["type"] = kind
        fields["sequence_number"] = next(seq)
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(fields) + b"\n\n"

    start = {**response, "status": "in_progress", "output": [], "usage": None}
    start["incomplete_details"] = None
    events = [ev("response.created", response=start), ev("response.in_progress", response=start)]
    for index, item in enumerate(output):
        at: Json = {"item_id": item["id"], "output_index": index}
        kind = item["type"]
        if kind == "web_search_call":
            events.append(
                ev(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "status": "in_progress"},
                )
            )
            for phase in ("in_progress", "searching", "completed"):
                events.append(ev(f"response.web_search_call.{phase}", **at))
        elif kind == "function_call":
            arguments = item["arguments"]
            opening = {**item, "status": "in_progress", "arguments": ""}
            events.append(ev("response.output_item.added", output_index=index, item=opening))
            events.extend(
                ev("response.function_call_arguments.delta", **at, delta=piece)
                for piece in _split(arguments)
            )
            events.append(ev("response.function_call_arguments.done", **at, arguments=arguments))
        else:
            part = item["content"][0]
            text = part["text"]
            opening = {**item, "status": "in_progress", "content": []}
            events.append(ev("response.output_item.added", output_index=index, item=opening))
            events.append(
                ev("response.content_part.added", **at, content_index=0, part={**part, "text": ""})
            )
            plain = response["text"]["format"]["type"] == "text"  # words, as chat streams them
            pieces = _pieces(text.split(" ")) if plain else _split(text)
            events.extend(
                ev("response.output_text.delta", **at, content_index=0, delta=p, logprobs=[])
                for p in pieces
            )
            events.append(
                ev("response.output_text.done", **at, content_index=0, text=text, logprobs=[])
            )
            events.append(ev("response.content_part.done", **at, content_index=0, part=part))
        events.append(ev("response.output_item.done", output_index=index, item=item))
    final = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
    events.append(ev(final, response=response))
    return events
