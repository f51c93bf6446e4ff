"""OpenAI chat completions and legacy text completions, whole and as SSE streams.

Stream events are built from pre-encoded byte templates (``_OpenAIStream``): only the choice
varies from one chunk to the next, so most events cost one ``orjson.dumps`` of a word.
"""

from __future__ import annotations

import time

import orjson
from aiohttp import web

from proxy.emulator.controls import _Controls, _stream
from proxy.emulator.prompts import _last_user_text, _messages, _model, _positive, _prompts, _text
from proxy.emulator.replies import _count, _pieces, _reply, _split
from proxy.emulator.schema import schema_instance
from proxy.emulator.state import _State
from proxy.emulator.tools import chat_calls
from proxy.emulator.wire import Json, _BadRequest, _json

_DONE = b"data: [DONE]\n\n"
_FP = "fp_emulator"


def _usage(prompt: int, completion: int) -> Json:
    return dict(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _fixed(cid: str, obj: str, model: str) -> Json:
    """The fields every OpenAI response and stream chunk starts with."""
    return dict(id=cid, object=obj, created=int(time.time()), model=model, system_fingerprint=_FP)


class _OpenAIStream:
    """Byte templates shared by every chunk of one OpenAI stream (only the choice varies)."""

    def __init__(self, fixed: Json, body: Json) -> None:
        options = body.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        self.head = b"data: " + orjson.dumps(fixed)[:-1] + b',"choices":['
        self.tail = b"]" + (b',"usage":null' if self.include_usage else b"") + b"}\n\n"

    def chunk(self, choice: Json) -> bytes:
        return self.head + orjson.dumps(choice) + self.tail

    def end(self, usage: Json) -> list[bytes]:
        """The usage chunk (only if asked for, with empty choices, as OpenAI does) and [DONE]."""
        if not self.include_usage:
            return [_DONE]
        return [self.head + b'],"usage":' + orjson.dumps(usage) + b"}\n\n", _DONE]


def _structured(body: Json, user_text: str, words: int | None) -> str | None:
    """The JSON reply ``response_format`` asks for (``json_schema``: a value fitting the
    schema, ``json_object``: an object), or None for plain text."""
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in ("json_schema", "json_object"):
        return None
    echo = " ".join(_reply(user_text, words, None)[0])
    spec = fmt.get("json_schema") if isinstance(fmt, dict) and kind == "json_schema" else None
    if kind == "json_schema" and not (
        isinstance(spec, dict) and isinstance(spec.get("schema"), dict)
    ):
        raise _BadRequest(
            "Missing required parameter: 'response_format.json_schema.schema'.",
            "response_format.json_schema.schema",
        )
    value = schema_instance(spec["schema"], echo) if spec is not None else {"echo": echo}
    return orjson.dumps(value).decode()


def _stop(cut: bool) -> str:
    return "length" if cut else "stop"


class _ChatEndpoints(_State):
    """``/v1/chat/completions`` and ``/v1/completions``."""

    async def chat(self, request: web.Request, body: Json, ctl: _Controls) -> web.StreamResponse:
        """Chat completions; tool calls by the rule of ``tools`` (``tool_choice``, parallel
        calls), JSON when ``response_format`` asks for it; ``n`` choices (alike: replies are
        deterministic), each billed."""
        model, messages = _model(body), _messages(body)
        prompt_tokens = max(1, sum(len(_text(m.get("content")).split()) for m in messages))
        user_text = _last_user_text(messages)
        limit = _positive(body, "max_completion_tokens") or _positive(body, "max_tokens")
        calls = chat_calls(body, messages[-1].get("role") == "user", user_text)
        cid = self.new_id("chatcmpl-")
        words: list[str] = []
        if calls:
            ids = [self.new_id("call_") for _ in calls]
            completion_tokens = sum(_count(arguments) for _, arguments in calls)
            finish, text = "tool_calls", None
        elif (structured := _structured(body, user_text, ctl.words)) is not None:
            text, finish = structured, "stop"
            words, completion_tokens = text.split(" "), _count(text)  # pieces rejoin exactly
        else:
            words, cut = _reply(user_text, ctl.words, limit)
            completion_tokens, text = len(words), " ".join(words)
            finish = "length" if cut else "stop"
        n = _positive(body, "n") or 1
        usage = _usage(prompt_tokens, completion_tokens * n)
        if body.get("stream") is not True:
            message: Json = {"role": "assistant", "content": text, "refusal": None}
            if calls:
                message["tool_calls"] = [
                    {"id": i, "type": "function", "function": {"name": name, "arguments": args}}
                    for i, (name, args) in zip(ids, calls, strict=True)
                ]
            choices = [
                {"index": i, "message": message, "logprobs": None, "finish_reason": finish}
                for i in range(n)
            ]
            return _json(
                {**_fixed(cid, "chat.completion", model), "choices": choices, "usage": usage}
            )
        out = _OpenAIStream(_fixed(cid, "chat.completion.chunk", model), body)

        def delta(d: Json, finish_reason: str | None = None) -> bytes:
            return out.chunk(
                {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish_reason}
            )

        if calls:
            events = []
            for k, (name, args) in enumerate(calls):  # each call: its id and name, then pieces
                opening: Json = {"index": k, "id": ids[k], "type": "function"}
                opening["function"] = {"name": name, "arguments": ""}
                lead: Json = {"role": "assistant", "content": None} if k == 0 else {}
                events.append(delta({**lead, "tool_calls": [opening]}))
                events.extend(
                    delta({"tool_calls": [{"index": k, "function": {"arguments": piece}}]})
                    for piece in _split(args)
                )
        else:
            events = [delta({"role": "assistant", "content": "", "refusal": None})]
            pre = out.head + b'{"index":0,"delta":{"content":'
            post = b'},"logprobs":null,"finish_reason":null}' + out.tail
            events.extend(pre + orjson.dumps(piece) + post for piece in _pieces(words))
        events.append(delta({}, finish))
        if n > 1:  # choice i streams after choice i-1, its events renumbered
            first = b'{"index":0,"delta"'
            events = [
                e.replace(first, b'{"index":%d,"delta"' % i) for i in range(n) for e in events
            ]
        return await _stream(request, events + out.end(usage), ctl)

    async def completions(
        self, request: web.Request, body: Json, ctl: _Controls
    ) -> web.StreamResponse:
        """Legacy text completions: one choice per prompt, as the real endpoint answers."""
        model, prompts = _model(body), _prompts(body.get("prompt"), "prompt")
        limit = _positive(body, "max_tokens")
        replies = [_reply(p, ctl.words, limit) for p in prompts]
        completion_tokens = sum(len(words) for words, _ in replies)
        usage = _usage(max(1, sum(len(p.split()) for p in prompts)), completion_tokens)
        cid = self.new_id("cmpl-")
        if body.get("stream") is not True:
            choices = [
                {"text": " ".join(w), "index": i, "logprobs": None, "finish_reason": _stop(cut)}
                for i, (w, cut) in enumerate(replies)
            ]
            return _json(
                {**_fixed(cid, "text_completion", model), "choices": choices, "usage": usage}
            )
        out = _OpenAIStream(_fixed(cid, "text_completion", model), body)
        events: list[bytes] = []
        for i, (words, cut) in enumerate(replies):
            post = b',"index":%d,"logprobs":null,"finish_reason":null}' % i + out.tail
            events.extend(out.head + b'{"text":' + orjson.dumps(p) + post for p in _pieces(words))
            events.append(
                out.chunk({"text": "", "index": i, "logprobs": None, "finish_reason": _stop(cut)})
            )
        return await _stream(request, events + out.end(usage), ctl)
