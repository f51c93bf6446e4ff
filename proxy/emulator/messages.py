"""Anthropic Messages, whole and as SSE streams.

Stream events are built from pre-encoded byte templates: only the delta text varies per event.
A follow-up carrying a ``tool_result`` gets text, not another tool call.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from proxy.emulator.controls import _Controls, _stream
from proxy.emulator.prompts import _last_user_text, _messages, _model, _positive, _text
from proxy.emulator.replies import _count, _pieces, _reply, _split, _tool_input, _tool_name
from proxy.emulator.state import _State
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


class _MessagesEndpoint(_State):
    """``/v1/messages``."""

    async def messages(
        self, request: web.Request, body: Json, ctl: _Controls
    ) -> web.StreamResponse:
        """Anthropic Messages; a follow-up carrying a tool_result gets text, not another call."""
        model, messages = _model(body), _messages(body)
        limit = _positive(body, "max_tokens")
        if limit is None:
            raise _BadRequest("max_tokens: Field required", "max_tokens")
        texts = [_text(body.get("system")), *(_text(m.get("content")) for m in messages)]
        input_tokens = max(1, sum(len(t.split()) for t in texts))
        last, user_text = messages[-1], _last_user_text(messages)
        content = last.get("content")
        answers_tool = isinstance(content, list) and any(
            isinstance(b, dict) and b.get("type") == "tool_result" for b in content
        )
        tool = None
        if last.get("role") == "user" and not answers_tool:
            tool = _tool_name(body, user_text)
        words: list[str] = []
        if tool:
            tool_input = _tool_input(user_text)
            partial = orjson.dumps(tool_input).decode()
            block: Json = dict(
                type="tool_use", id=self.new_id("toolu_"), name=tool, input=tool_input
            )
            output_tokens, stop = _count(partial), "tool_use"
        else:
            words, cut = _reply(user_text, ctl.words, limit)
            block = {"type": "text", "text": " ".join(words)}
            output_tokens, stop = len(words), "max_tokens" if cut else "end_turn"
        usage = {"input_tokens": input_tokens, "output_tokens": output_tokens, **_NO_CACHE}
        message: Json = dict(id=self.new_id("msg_"), type="message", role="assistant", model=model)
        message.update(content=[block], stop_reason=stop, stop_sequence=None, usage=usage)
        if body.get("stream") is not True:
            return _json(message)
        start: Json = {**message, "content": [], "stop_reason": None}
        start["usage"] = {**usage, "output_tokens": 1}
        if tool:
            opening = {**block, "input": {}}
            deltas = [_A_JSON_PRE + orjson.dumps(p) + _A_DELTA_POST for p in ["", *_split(partial)]]
        else:
            opening = {"type": "text", "text": ""}
            deltas = [_A_TEXT_PRE + orjson.dumps(p) + _A_DELTA_POST for p in _pieces(words)]
        end = {"stop_reason": stop, "stop_sequence": None}
        events = [
            _sse(b"message_start", {"type": "message_start", "message": start}),
            _sse(
                b"content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": opening},
            ),
            _A_PING,
            *deltas,
            _A_BLOCK_STOP,
            _sse(
                b"message_delta",
                {"type": "message_delta", "delta": end, "usage": {"output_tokens": output_tokens}},
            ),
            _A_MESSAGE_STOP,
        ]
        return await _stream(request, events, ctl)
