"""Anthropic Messages, whole and as SSE streams.

Stream events are built from pre-encoded byte templates: only the delta text varies per event.
A follow-up carrying a ``tool_result`` gets text, not another tool call. Structured outputs
(``output_config.format``) answer JSON valid for the schema; ``thinking`` (enabled or adaptive)
puts a thinking block before the answer, with its budget checked as the API checks it.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from proxy.emulator.controls import _Controls, _stream
from proxy.emulator.prompts import _last_user_text, _messages, _model, _positive, _text
from proxy.emulator.replies import _count, _pieces, _reply, _split
from proxy.emulator.schema import schema_instance
from proxy.emulator.state import _State
from proxy.emulator.tools import messages_calls
from proxy.emulator.wire import Json, _BadRequest, _json

# Anthropic stream templates: only the delta text varies per event.
_NO_CACHE = {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
_A_DELTA = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":'
_A_TEXT_PRE = _A_DELTA + b'{"type":"text_delta","text":'
_A_JSON_PRE = _A_DELTA + b'{"type":"input_json_delta","partial_json":'
_A_DELTA_POST = b"}}\n\n"
_A_PING = b'event: ping\ndata: {"type":"ping"}\n\n'
_A_BLOCK_STOP = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
_A_MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def _sse(event: bytes, data: Json) -> bytes:
    return b"event: " + event + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _structured(body: Json, user_text: str, words: int | None) -> str | None:
    """The JSON text ``output_config.format`` asks for (a value fitting its schema), or None."""
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise _BadRequest("output_config.format.type: Input should be 'json_schema'")
    if not isinstance(fmt.get("schema"), dict):
        raise _BadRequest("output_config.format.schema: Field required")
    echo = " ".join(_reply(user_text, words, None)[0])
    return orjson.dumps(schema_instance(fmt["schema"], echo)).decode()


def _thinking(body: Json, user_text: str, limit: int) -> str | None:
    """The thinking text when ``thinking`` asks for it (enabled or adaptive), or None; a
    budget below 1024 or not below ``max_tokens`` is refused, as the API refuses it."""
    config = body.get("thinking")
    kind = config.get("type") if isinstance(config, dict) else None
    if kind not in ("enabled", "adaptive"):
        return None
    if kind == "enabled":
        budget = config.get("budget_tokens")  # type: ignore[union-attr]
        if not isinstance(budget, int) or budget < 1024:
            raise _BadRequest("thinking.enabled.budget_tokens: Input should be >= 1024")
        if budget >= limit:
            raise _BadRequest("`max_tokens` must be greater than `thinking.budget_tokens`.")
    return "Considering: " + user_text


def _input_tokens(body: Json, messages: list[Json]) -> int:
    """The input tokens of a Messages request: the words of the system prompt and of every
    message, at least 1. ``/v1/messages`` and ``/v1/messages/count_tokens`` both count so,
    so a count predicts the usage the message then reports."""
    texts = [_text(body.get("system")), *(_text(m.get("content")) for m in messages)]
    return max(1, sum(len(t.split()) for t in texts))


# sampling and output fields: count_tokens refuses them, as the real endpoint does
_NOT_COUNTED = ("max_tokens", "stream", "stop_sequences", "temperature", "top_p", "top_k")


class _MessagesEndpoint(_State):
    """``/v1/messages`` and ``/v1/messages/count_tokens``."""

    async def count_tokens(
        self, request: web.Request, body: Json, ctl: _Controls
    ) -> web.StreamResponse:
        """Anthropic's token counting: ``{"input_tokens": n}``, what the message would report."""
        _model(body)
        messages = _messages(body)
        for name in _NOT_COUNTED:
            if name in body:
                raise _BadRequest(f"{name}: Extra inputs are not permitted", name)
        return _json({"input_tokens": _input_tokens(body, messages)})

    async def messages(
        self, request: web.Request, body: Json, ctl: _Controls
    ) -> web.StreamResponse:
        """Anthropic Messages; tool_use blocks by the rule of ``tools`` (a follow-up carrying a
        tool_result gets text under ``auto``)."""
        model, messages = _model(body), _messages(body)
        limit = _positive(body, "max_tokens")
        if limit is None:
            raise _BadRequest("max_tokens: Field required", "max_tokens")
        input_tokens = _input_tokens(body, messages)
        last, user_text = messages[-1], _last_user_text(messages)
        content = last.get("content")
        answers_tool = isinstance(content, list) and any(
            isinstance(b, dict) and b.get("type") == "tool_result" for b in content
        )
        user_turn = last.get("role") == "user" and not answers_tool
        calls = messages_calls(body, user_turn, user_text)
        words: list[str] = []
        thought = _thinking(body, user_text, limit)
        if calls:
            answer_blocks: list[Json] = [
                dict(type="tool_use", id=self.new_id("toolu_"), name=name, input=orjson.loads(args))
                for name, args in calls
            ]
            output_tokens, stop = sum(_count(args) for _, args in calls), "tool_use"
        elif (structured := _structured(body, user_text, ctl.words)) is not None:
            answer_blocks = [{"type": "text", "text": structured}]
            words, output_tokens, stop = structured.split(" "), _count(structured), "end_turn"
        else:
            words, cut = _reply(user_text, ctl.words, limit)
            answer_blocks = [{"type": "text", "text": " ".join(words)}]
            output_tokens, stop = len(words), "max_tokens" if cut else "end_turn"
        usage = {"input_tokens": input_tokens, "output_tokens": output_tokens, **_NO_CACHE}
        message: Json = dict(id=self.new_id("msg_"), type="message", role="assistant", model=model)
        blocks = list(answer_blocks)
        if thought is not None:
            usage["output_tokens"] = output_tokens = output_tokens + _count(thought)
            signature = self.new_id("sig_")
            blocks.insert(0, {"type": "thinking", "thinking": thought, "signature": signature})
        message.update(content=blocks, stop_reason=stop, stop_sequence=None, usage=usage)
        if body.get("stream") is not True:
            return _json(message)
        start: Json = {**message, "content": [], "stop_reason": None}
        start["usage"] = {**usage, "output_tokens": 1}
        streamed: list[tuple[Json, list[bytes]]] = []  # each answer block: opening, deltas
        if calls:
            for block, (_, args) in zip(answer_blocks, calls, strict=True):
                pieces = ["", *_split(args)]
                deltas = [_A_JSON_PRE + orjson.dumps(p) + _A_DELTA_POST for p in pieces]
                streamed.append(({**block, "input": {}}, deltas))
        else:
            deltas = [_A_TEXT_PRE + orjson.dumps(p) + _A_DELTA_POST for p in _pieces(words)]
            streamed.append(({"type": "text", "text": ""}, deltas))
        end = {"stop_reason": stop, "stop_sequence": None}
        first = 0 if thought is None else 1  # the thinking block is block 0, the answer after
        answer: list[bytes] = []
        for k, (opening, deltas) in enumerate(streamed):
            start_block = {"type": "content_block_start", "index": 0, "content_block": opening}
            events = [_sse(b"content_block_start", start_block), *deltas, _A_BLOCK_STOP]
            if first + k:  # the templates say block 0: renumbered (the first index in each)
                index = b'"index":%d' % (first + k)
                events = [e.replace(b'"index":0', index, 1) for e in events]
            answer.extend(events)
        if thought is not None:
            answer[:0] = _thinking_events(thought, blocks[0]["signature"])
        answer.insert(1, _A_PING)  # after the first block's start, as the API sends it
        events = [
            _sse(b"message_start", {"type": "message_start", "message": start}),
            *answer,
            _sse(
                b"message_delta",
                {"type": "message_delta", "delta": end, "usage": {"output_tokens": output_tokens}},
            ),
            _A_MESSAGE_STOP,
        ]
        return await _stream(request, events, ctl)


def _thinking_events(thought: str, signature: str) -> list[bytes]:
    """A thinking block streamed: its start, the text, the signature, its stop (block 0)."""
    opening = {"type": "thinking", "thinking": "", "signature": ""}
    deltas = [{"type": "thinking_delta", "thinking": thought}]
    deltas.append({"type": "signature_delta", "signature": signature})
    return [
        _sse(
            b"content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": opening},
        ),
        *(
            _sse(b"content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d})
            for d in deltas
        ),
        _A_BLOCK_STOP,
    ]
