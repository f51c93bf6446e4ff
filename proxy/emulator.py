"""An OpenAI- and Anthropic-compatible upstream emulator for the demo, the tests and benchmarks.

There is no internet here, yet the gateway must be exercised against something that speaks the
providers' wire formats closely enough that the official ``openai`` and ``anthropic`` SDKs work
against it unchanged. Replies are deterministic (``"Echo:"`` plus the words of the last user
message) so tests can assert exact output, and tokens follow one rule (whitespace-separated
words, at least 1) so usage metering can be checked by hand.

Benchmarks use it as the upstream, so the hot path avoids needless work: static bodies are
serialised once, stream events are built from pre-encoded byte templates, and a stream with no
pacing controls goes out in a single write.

Behaviour is steered per request by ``x-emulator-*`` headers (see ``_Controls``), which the
gateway forwards untouched, or by a model named ``emu-slow-<ms>`` where headers can't be set.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import logging
import math
import re
import secrets
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import orjson
from aiohttp import web

Json = dict[str, Any]
Dialect = Literal["openai", "anthropic"]
Impl = Callable[[web.Request, Json, "_Controls"], Awaitable[web.StreamResponse]]
Hdrs = Mapping[str, str] | None
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger(__name__)

_JSON = "application/json"
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_DONE = b"data: [DONE]\n\n"
_FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
_FP = "fp_emulator"
_MAX_WORDS = 1_000_000  # cap on x-emulator-words so a typo can't exhaust memory
_MAX_DIMENSIONS = 8192
_HANG_SECONDS = 3600.0
_HANG_POLL = 0.05  # how often a hung request checks whether its client went away
_CITY = re.compile(r"\b(?:in|for|at)\s+([A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)*)")

# /v1/models answers in the shape of whichever SDK asks (Anthropic's sends anthropic-version).
_MODEL_IDS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
_CLAUDE_IDS = ("claude-sonnet-4-6", "claude-haiku-4-5")
_OPENAI_MODELS = orjson.dumps(
    {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "emulator"}
            for m in (*_MODEL_IDS, *_CLAUDE_IDS)
        ],
    }
)
_ANTHROPIC_MODELS = orjson.dumps(
    {
        "data": [
            {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
            for m in _CLAUDE_IDS
        ],
        "has_more": False,
        "first_id": _CLAUDE_IDS[0],
        "last_id": _CLAUDE_IDS[-1],
    }
)

_ANTHROPIC_ERRORS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
_ANTHROPIC_ERRORS |= {413: "request_too_large", 429: "rate_limit_error", 500: "api_error"}
_ANTHROPIC_ERRORS |= {503: "overloaded_error", 529: "overloaded_error"}

# Anthropic stream templates: only the delta text varies per event.
_NO_CACHE = {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
_A_DELTA = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":'
_A_TEXT_PRE = _A_DELTA + b'{"type":"text_delta","text":'
_A_JSON_PRE = _A_DELTA + b'{"type":"input_json_delta","partial_json":'
_A_DELTA_POST = b"}}\n\n"
_A_PING = b'event: ping\ndata: {"type":"ping"}\n\n'
_A_BLOCK_STOP = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
_A_MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


class _BadRequest(Exception):
    """A request the real API would refuse with 400; rendered in the route's error shape."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(slots=True)
class _Controls:
    """Per-request behaviour asked for by ``x-emulator-*`` headers or an ``emu-slow-N`` model.

    Headers win over the model name. Garbled values are ignored rather than refused, so a
    control can never turn into an unexpected error.
    """

    latency: float = 0.0  # x-emulator-latency-ms: wait before answering
    chunk_delay: float = 0.0  # x-emulator-chunk-delay-ms: wait between stream events
    words: int | None = None  # x-emulator-words: reply length
    status: int | None = None  # x-emulator-status: answer with this error status
    retry_after: str | None = None  # x-emulator-retry-after: Retry-After on that error
    fail_times: int | None = None  # x-emulator-fail-times: fail only the first N per key
    key: str = ""  # x-emulator-key: whose fail_times budget this request spends
    hang: bool = False  # x-emulator-hang: never answer
    abort_after: int | None = None  # x-emulator-stream-abort-after: drop the stream after N

    @classmethod
    def parse(cls, headers: Mapping[str, str], body: Json) -> _Controls:
        ctl = cls()
        model = body.get("model")
        if isinstance(model, str) and model.startswith("emu-slow-"):
            ctl.latency = _seconds(model[9:])
        get = headers.get
        if (v := get("x-emulator-latency-ms")) is not None:
            ctl.latency = _seconds(v)
        if (v := get("x-emulator-chunk-delay-ms")) is not None:
            ctl.chunk_delay = _seconds(v)
        if (n := _int(get("x-emulator-words"))) is not None:
            ctl.words = min(max(n, 1), _MAX_WORDS)
        if (n := _int(get("x-emulator-status"))) is not None and 400 <= n <= 599:
            ctl.status = n
        ctl.retry_after = get("x-emulator-retry-after")
        ctl.fail_times = _int(get("x-emulator-fail-times"))
        ctl.key = get("x-emulator-key", "")
        ctl.hang = get("x-emulator-hang", "0").lower() not in ("0", "", "false", "no")
        ctl.abort_after = _int(get("x-emulator-stream-abort-after"))
        return ctl


def _int(value: str | None) -> int | None:
    """A non-negative integer header value, or None when absent or garbled."""
    try:
        n = int(value) if value is not None else -1
    except ValueError:
        return None
    return n if n >= 0 else None


def _seconds(ms: str) -> float:
    """Milliseconds text to seconds; garbled or negative values mean no delay."""
    try:
        return max(float(ms), 0.0) / 1000.0
    except ValueError:
        return 0.0


def _count(text: str) -> int:
    """The emulator's token rule: whitespace-separated words, at least 1."""
    return max(1, len(text.split()))


def _text(content: Any) -> str:
    """The plain text of a message content: a string or a list of text/tool_result blocks."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content if isinstance(content, list) else ():
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict):
            text = block.get("text")
            if isinstance(text, str):
                parts.append(text)
            elif block.get("type") == "tool_result":
                parts.append(_text(block.get("content")))
    return " ".join(parts)


def _model(body: Json) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("you must provide a model parameter", "model")
    return model


def _messages(body: Json) -> list[Json]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty array", "messages")
    if not all(isinstance(m, dict) for m in messages):
        raise _BadRequest("each message must be an object", "messages")
    return messages


def _last_user_text(messages: list[Json]) -> str:
    return next(
        (_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
    )


def _prompts(raw: Any, param: str) -> list[str]:
    """Strings, or token-id arrays rendered as text (so each id counts as one token)."""
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(x, str) for x in raw):
            return raw
        if all(isinstance(x, int) for x in raw):
            return [" ".join(map(str, raw))]
        if all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in raw):
            return [" ".join(map(str, x)) for x in raw]
    raise _BadRequest(f"'{param}' must be a string, or an array of strings or tokens", param)


def _positive(body: Json, name: str, default: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _BadRequest(f"'{name}' must be a positive integer", name)
    return value


def _reply(prompt: str, words: int | None, limit: int | None) -> tuple[list[str], bool]:
    """The deterministic reply words and whether ``limit`` cut them short."""
    out = ["Echo:", *prompt.split()]
    if words is not None:
        if len(out) < words:
            out.extend(itertools.islice(itertools.cycle(_FILLER), words - len(out)))
        del out[words:]
    if limit is not None and len(out) > limit:
        del out[limit:]
        return out, True
    return out, False


def _pieces(words: list[str]) -> list[str]:
    """Stream deltas, one per word, that concatenate back to the non-stream text."""
    return [words[0], *(" " + w for w in words[1:])]


def _tool_name(body: Json, user_text: str) -> str | None:
    """The tool to 'call' when tools are offered and the user asks about the weather."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools or "weather" not in user_text.lower():
        return None
    choice = body.get("tool_choice")
    if choice == "none" or (isinstance(choice, dict) and choice.get("type") == "none"):
        return None
    first = tools[0] if isinstance(tools[0], dict) else {}
    fn = first.get("function")
    name = fn.get("name") if isinstance(fn, dict) else first.get("name")
    return name if isinstance(name, str) and name else "get_weather"


def _tool_input(user_text: str) -> Json:
    match = _CITY.search(user_text)
    return {"location": match.group(1) if match else "Paris"}


def _split(text: str, size: int = 8) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


@lru_cache(maxsize=8192)
def _vector(text: str, dim: int) -> tuple[list[float], str]:
    """A unit vector derived from one input alone, as float32 values and as base64.

    Hashing makes it deterministic and independent of the rest of a batch; the floats are
    round-tripped through float32 so both encodings decode to the same numbers. Cached because
    benchmarks embed the same texts over and over.
    """
    raw = struct.unpack(f"<{dim}h", hashlib.shake_256(text.encode()).digest(2 * dim))
    norm = math.sqrt(sum(x * x for x in raw))
    vec = [x / norm for x in raw] if norm else [1.0] + [0.0] * (dim - 1)
    packed = struct.pack(f"<{dim}f", *vec)
    return list(struct.unpack(f"<{dim}f", packed)), base64.b64encode(packed).decode("ascii")


def _error(
    dialect: Dialect, status: int, message: str, param: str | None = None, headers: Hdrs = None
) -> web.Response:
    """An error in the dialect's shape, so the SDKs raise their typed exceptions."""
    if dialect == "anthropic":
        kind = _ANTHROPIC_ERRORS.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        payload: Json = {"type": "error", "error": {"type": kind, "message": message}}
    else:  # OpenAI's real (type, code) pairs
        kind, code = "invalid_request_error", None
        if status == 429:
            kind, code = "requests", "rate_limit_exceeded"
        elif status == 401:
            code = "invalid_api_key"
        elif status >= 500:
            kind = "server_error"
        payload = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    body = orjson.dumps(payload)
    return web.Response(body=body, status=status, content_type=_JSON, headers=headers)


def _json(payload: Any) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type=_JSON)


def _sse(event: bytes, data: Json) -> bytes:
    return b"event: " + event + b"\ndata: " + orjson.dumps(data) + b"\n\n"


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


async def _stream(request: web.Request, events: list[bytes], ctl: _Controls) -> web.StreamResponse:
    """Send SSE events, honouring chunk delay and abort; a vanished client ends it quietly."""
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    try:
        await resp.prepare(request)
        if not ctl.chunk_delay and ctl.abort_after is None:
            await resp.write(b"".join(events))  # one write: the fast path for benchmarks
        else:
            for i, event in enumerate(events):
                if i == ctl.abort_after:
                    if request.transport is not None:
                        request.transport.close()  # no chunked terminator: a truncated body
                    return resp
                if i and ctl.chunk_delay:
                    await asyncio.sleep(ctl.chunk_delay)
                await resp.write(event)
        await resp.write_eof()
    except ConnectionError:
        pass
    return resp


async def _hang(request: web.Request) -> bool:
    """Hold the request without answering; False once the client has gone away.

    aiohttp cancels handlers on disconnect only when ``handler_cancellation`` is on, which an
    embedding runner may not set, so the connection is polled as well.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _HANG_SECONDS
    while loop.time() < deadline:
        if request.transport is None or request.transport.is_closing():
            return False
        await asyncio.sleep(_HANG_POLL)
    return True


class _Emulator:
    """The emulator's state (counters, last request, failure budgets) and its handlers."""

    def __init__(self, api_key: str | None) -> None:
        self.api_key = api_key
        self.bearer = f"Bearer {api_key}"
        self.requests = 0
        self.by_path: Counter[str] = Counter()
        self.in_flight = 0
        self.failures: Counter[str] = Counter()
        self.last: tuple[str, Mapping[str, str], Any] | None = None
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(6)

    def new_id(self, prefix: str) -> str:
        """A unique id in the provider's style; a counter is cheaper than randomness per call."""
        return f"{prefix}{self._prefix}{next(self._ids):08x}"

    def route(self, dialect: Dialect | None, impl: Impl, *, needs_body: bool = True) -> Handler:
        """Wrap an endpoint with accounting, auth, body parsing and the injected faults.

        ``dialect`` None means: Anthropic if the client sent ``anthropic-version``, else OpenAI.
        """

        async def handler(request: web.Request) -> web.StreamResponse:
            return await self._serve(request, dialect, impl, needs_body)

        return handler

    async def _serve(
        self, request: web.Request, dialect: Dialect | None, impl: Impl, needs_body: bool
    ) -> web.StreamResponse:
        self.requests += 1
        self.by_path[request.path] += 1
        self.in_flight += 1
        if dialect is None:
            dialect = "anthropic" if "anthropic-version" in request.headers else "openai"
        try:
            body: Any = None
            if needs_body:
                try:
                    body = orjson.loads(await request.read())
                except orjson.JSONDecodeError:
                    body = None
            self.last = (request.path, request.headers, body)
            if self.api_key is not None and not self._authorised(request, dialect):
                return _error(dialect, 401, "Incorrect API key provided.")
            if needs_body and not isinstance(body, dict):
                return _error(dialect, 400, "We could not parse the JSON body of your request.")
            payload: Json = body if isinstance(body, dict) else {}
            ctl = _Controls.parse(request.headers, payload)
            if ctl.hang and not await _hang(request):
                return web.Response(status=499)  # nobody is listening any more
            if ctl.latency:
                await asyncio.sleep(ctl.latency)
            status = self._injected_status(ctl)
            if status is not None:
                headers = {"Retry-After": ctl.retry_after} if ctl.retry_after else None
                message = f"Emulated HTTP {status} error (x-emulator-status)"
                return _error(dialect, status, message, headers=headers)
            return await impl(request, payload, ctl)
        except _BadRequest as exc:
            return _error(dialect, 400, exc.message, param=exc.param)
        except web.HTTPException as exc:  # e.g. 413 from request.read(): keep the API's shape
            return _error(dialect, exc.status, exc.reason)
        except ConnectionError:  # the client left while we read its body
            return web.Response(status=499)
        except Exception:
            log.exception("emulator failed on %s", request.path)
            return _error(dialect, 500, "The emulator had an error processing your request.")
        finally:
            self.in_flight -= 1

    def _authorised(self, request: web.Request, dialect: Dialect) -> bool:
        """Bearer for OpenAI; Anthropic takes x-api-key or, as its newer SDKs send, Bearer."""
        headers = request.headers
        if dialect == "anthropic" and headers.get("x-api-key") == self.api_key:
            return True
        return headers.get("Authorization") == self.bearer

    def _injected_status(self, ctl: _Controls) -> int | None:
        """The error status to answer with: always, or for the first N requests of a key."""
        if ctl.fail_times is None:
            return ctl.status
        self.failures[ctl.key] += 1
        return (ctl.status or 500) if self.failures[ctl.key] <= ctl.fail_times else None

    # ---- OpenAI ----------------------------------------------------------------------------

    async def chat(self, request: web.Request, body: Json, ctl: _Controls) -> web.StreamResponse:
        """Chat completions; a tool call when tools are offered and the user asks for weather."""
        model, messages = _model(body), _messages(body)
        prompt_tokens = max(1, sum(len(_text(m.get("content")).split()) for m in messages))
        user_text = _last_user_text(messages)
        limit = _positive(body, "max_completion_tokens") or _positive(body, "max_tokens")
        tool = _tool_name(body, user_text) if messages[-1].get("role") == "user" else None
        cid = self.new_id("chatcmpl-")
        words: list[str] = []
        if tool:
            arguments = orjson.dumps(_tool_input(user_text)).decode()
            call = {"id": self.new_id("call_"), "type": "function"}
            completion_tokens, finish, text = _count(arguments), "tool_calls", None
        else:
            words, cut = _reply(user_text, ctl.words, limit)
            completion_tokens, text = len(words), " ".join(words)
            finish = "length" if cut else "stop"
        usage = _usage(prompt_tokens, completion_tokens)
        if body.get("stream") is not True:
            message: Json = {"role": "assistant", "content": text, "refusal": None}
            if tool:
                message["tool_calls"] = [
                    {**call, "function": {"name": tool, "arguments": arguments}}
                ]
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            return _json(
                {**_fixed(cid, "chat.completion", model), "choices": [choice], "usage": usage}
            )
        out = _OpenAIStream(_fixed(cid, "chat.completion.chunk", model), body)

        def delta(d: Json, finish_reason: str | None = None) -> bytes:
            return out.chunk(
                {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish_reason}
            )

        if tool:
            opening = {"index": 0, **call, "function": {"name": tool, "arguments": ""}}
            events = [delta({"role": "assistant", "content": None, "tool_calls": [opening]})]
            events.extend(
                delta({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                for piece in _split(arguments)
            )
        else:
            events = [delta({"role": "assistant", "content": "", "refusal": None})]
            pre = out.head + b'{"index":0,"delta":{"content":'
            post = b'},"logprobs":null,"finish_reason":null}' + out.tail
            events.extend(pre + orjson.dumps(piece) + post for piece in _pieces(words))
        events.append(delta({}, finish))
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

    async def embeddings(
        self, request: web.Request, body: Json, ctl: _Controls
    ) -> web.StreamResponse:
        """Embeddings in float or base64 (the openai SDK asks for base64 unless told otherwise)."""
        model, texts = _model(body), _prompts(body.get("input"), "input")
        dim = _positive(body, "dimensions", 8) or 8
        if dim > _MAX_DIMENSIONS:
            raise _BadRequest(f"'dimensions' must be at most {_MAX_DIMENSIONS}", "dimensions")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise _BadRequest("'encoding_format' must be 'float' or 'base64'", "encoding_format")
        slot = 1 if fmt == "base64" else 0
        data = [
            {"object": "embedding", "index": i, "embedding": _vector(text, dim)[slot]}
            for i, text in enumerate(texts)
        ]
        tokens = sum(_count(t) for t in texts)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return _json({"object": "list", "data": data, "model": model, "usage": usage})

    async def models(self, request: web.Request, body: Json, ctl: _Controls) -> web.Response:
        anthropic = "anthropic-version" in request.headers
        return web.Response(
            body=_ANTHROPIC_MODELS if anthropic else _OPENAI_MODELS, content_type=_JSON
        )

    async def not_found(self, request: web.Request, body: Json, ctl: _Controls) -> web.Response:
        dialect: Dialect = "anthropic" if "anthropic-version" in request.headers else "openai"
        return _error(dialect, 404, f"Unknown request URL: {request.method} {request.path}")

    # ---- Anthropic -------------------------------------------------------------------------

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

    # ---- control and inspection ------------------------------------------------------------

    async def stats(self, request: web.Request) -> web.Response:
        return _json(
            {"requests": self.requests, "by_path": self.by_path, "in_flight": self.in_flight}
        )

    async def reset(self, request: web.Request) -> web.Response:
        """Zero the counters and fail-times budgets; in_flight keeps tracking live requests."""
        self.requests = 0
        self.by_path.clear()
        self.failures.clear()
        return _json({"ok": True})

    async def last_request(self, request: web.Request) -> web.Response:
        """The last /v1 request; header names are lower-cased so tests can look them up."""
        if self.last is None:
            return _json({"path": None, "headers": {}, "body": None})
        path, headers, body = self.last
        lowered = {k.lower(): v for k, v in headers.items()}
        return _json({"path": path, "headers": lowered, "body": body})


def _stop(cut: bool) -> str:
    return "length" if cut else "stop"


def create_emulator_app(*, api_key: str | None = None) -> web.Application:
    """Build the emulator; with ``api_key`` every /v1 request must present it."""
    emu = _Emulator(api_key)
    app = web.Application(client_max_size=64 * 1024 * 1024)  # benchmarks send big prompts
    app.router.add_post("/v1/chat/completions", emu.route("openai", emu.chat))
    app.router.add_post("/v1/completions", emu.route("openai", emu.completions))
    app.router.add_post("/v1/embeddings", emu.route("openai", emu.embeddings))
    app.router.add_post("/v1/messages", emu.route("anthropic", emu.messages))
    app.router.add_get("/v1/models", emu.route(None, emu.models, needs_body=False))
    app.router.add_route("*", "/v1/{tail:.*}", emu.route(None, emu.not_found, needs_body=False))
    app.router.add_get("/_emulator/stats", emu.stats)
    app.router.add_post("/_emulator/reset", emu.reset)
    app.router.add_get("/_emulator/last", emu.last_request)
    return app


async def _run(host: str, port: int, api_key: str | None) -> None:
    runner = web.AppRunner(
        create_emulator_app(api_key=api_key),
        access_log=None,  # per-request logging would dominate benchmark profiles
        handler_cancellation=True,
        handle_signals=True,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound = runner.addresses[0][1] if runner.addresses else port
        print(f"emulator listening on http://{host}:{bound}", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def serve(host: str = "127.0.0.1", port: int = 9100, api_key: str | None = None) -> None:
    """Run the emulator until SIGINT/SIGTERM, on uvloop when it is installed."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_run(host, port, api_key))
    except (KeyboardInterrupt, web.GracefulExit):
        pass
