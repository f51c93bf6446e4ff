"""An OpenAI- and Anthropic-compatible upstream emulator for the demo, the tests and benchmarks.

There is no internet here, yet the gateway must be exercised against something that speaks the
providers' real wire formats closely enough that the official ``openai`` and ``anthropic`` SDKs
work against it unchanged. Replies are deterministic (``"Echo: "`` plus the words of the last user
message) so tests can assert exact output, and token counts follow one simple rule (whitespace
separated words, at least 1) so usage metering can be checked by hand.

Because benchmarks use it as the upstream, the hot path avoids needless work: static bodies are
serialised once, stream events are built from pre-encoded byte templates, and a stream with no
pacing controls is written in a single call.

Behaviour can be steered per request with ``x-emulator-*`` headers (see ``_Controls``), which the
gateway forwards untouched, or with a model named ``emu-slow-<ms>`` where headers can't be set.
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
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger(__name__)

_JSON = "application/json"
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_DONE = b"data: [DONE]\n\n"
_FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
_FINGERPRINT = "fp_emulator"
_MAX_WORDS = 1_000_000  # cap on x-emulator-words so a typo can't exhaust memory
_MAX_DIMENSIONS = 8192
_HANG_SECONDS = 3600.0
_HANG_POLL = 0.05  # how often a hung request checks whether its client went away
_CITY = re.compile(r"\b(?:in|for|at)\s+([A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)*)")

_MODEL_IDS = (
    "gpt-4o-mini",
    "gpt-4o",
    "text-embedding-3-small",
    "claude-sonnet-4-5",
    "claude-haiku-4-5",
)
# /v1/models is served in whichever shape the caller's SDK expects; both bodies are static.
_OPENAI_MODELS = orjson.dumps(
    {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "emulator"}
            for m in _MODEL_IDS
        ],
    }
)
_ANTHROPIC_MODELS = orjson.dumps(
    {
        "data": [
            {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
            for m in _MODEL_IDS
            if m.startswith("claude")
        ],
        "has_more": False,
        "first_id": "claude-sonnet-4-5",
        "last_id": "claude-haiku-4-5",
    }
)

_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}

# Anthropic stream templates: only the delta text varies per event.
_A_TEXT_PRE = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":'
)
_A_JSON_PRE = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"input_json_delta","partial_json":'
)
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

    Headers win over the model name. Unparsable values are ignored rather than refused, so a
    control can never turn into an unexpected error.
    """

    latency: float = 0.0  # x-emulator-latency-ms: wait before answering
    chunk_delay: float = 0.0  # x-emulator-chunk-delay-ms: wait between stream events
    words: int | None = None  # x-emulator-words: reply length
    status: int | None = None  # x-emulator-status: answer with this error status
    retry_after: str | None = None  # x-emulator-retry-after: Retry-After on that error
    fail_times: int | None = None  # x-emulator-fail-times: fail only the first N per key
    key: str = ""  # x-emulator-key: the counter fail_times uses
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
    if value is None:
        return None
    try:
        n = int(value)
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
    if not isinstance(content, list):
        return ""
    parts: list[str] = []
    for block in content:
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


def _limit(body: Json, *names: str) -> int | None:
    """The first output-length limit present among ``names`` (a positive integer)."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _BadRequest(f"'{name}' must be a positive integer", name)
        return value
    return None


def _reply(prompt: str, words: int | None, limit: int | None) -> tuple[list[str], bool]:
    """The deterministic reply words and whether ``limit`` cut them short."""
    out = ["Echo:", *prompt.split()]
    if words is not None:
        if len(out) < words:
            out.extend(itertools.islice(itertools.cycle(_FILLER), words - len(out)))
        else:
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
def _vector(key: str, dim: int) -> tuple[list[float], str]:
    """A unit vector derived from the input alone, as float32 values and as base64.

    Hashing makes it deterministic and independent of the other inputs of a batch; the floats
    are round-tripped through float32 so the float and base64 encodings decode identically.
    Cached because benchmarks embed the same texts over and over.
    """
    raw = struct.unpack(f"<{dim}h", hashlib.shake_256(key.encode()).digest(2 * dim))
    norm = math.sqrt(sum(x * x for x in raw))
    vec = [x / norm for x in raw] if norm else [1.0] + [0.0] * (dim - 1)
    packed = struct.pack(f"<{dim}f", *vec)
    return list(struct.unpack(f"<{dim}f", packed)), base64.b64encode(packed).decode("ascii")


def _openai_error_kind(status: int) -> tuple[str, str | None]:
    """OpenAI's (type, code) for a status, as the real API sends them."""
    if status == 429:
        return "requests", "rate_limit_exceeded"
    if status == 401:
        return "invalid_request_error", "invalid_api_key"
    if status >= 500:
        return "server_error", None
    return "invalid_request_error", None


def _error(
    dialect: Dialect,
    status: int,
    message: str,
    *,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error in the dialect's shape, so the SDKs raise their typed exceptions."""
    if dialect == "anthropic":
        etype = _ANTHROPIC_ERRORS.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        payload: Json = {"type": "error", "error": {"type": etype, "message": message}}
    else:
        etype, code = _openai_error_kind(status)
        payload = {"error": {"message": message, "type": etype, "param": param, "code": code}}
    return web.Response(
        body=orjson.dumps(payload), status=status, content_type=_JSON, headers=headers
    )


def _json(payload: Any) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type=_JSON)


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
        transport = request.transport
        if transport is None or transport.is_closing():
            return False
        await asyncio.sleep(_HANG_POLL)
    return True


class _Emulator:
    """The emulator's state (counters, last request, failure counts) and its handlers."""

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
        """A unique id in the provider's style; a counter is cheaper than random per call."""
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
        except Exception:
            log.exception("emulator failed on %s", request.path)
            return _error(dialect, 500, "The emulator had an error processing your request.")
        finally:
            self.in_flight -= 1

    def _authorised(self, request: web.Request, dialect: Dialect) -> bool:
        if dialect == "anthropic":
            return request.headers.get("x-api-key") == self.api_key
        return request.headers.get("Authorization") == self.bearer

    def _injected_status(self, ctl: _Controls) -> int | None:
        """The error status to answer with: always, or for the first N requests of a key."""
        if ctl.fail_times is None:
            return ctl.status
        self.failures[ctl.key] += 1
        return (ctl.status or 500) if self.failures[ctl.key] <= ctl.fail_times else None

    # ---- OpenAI ----------------------------------------------------------------------------

    async def chat(self, request: web.Request, body: Json, ctl: _Controls) -> web.StreamResponse:
        model = _model(body)
        messages = _messages(body)
        texts = [_text(m.get("content")) for m in messages]
        prompt_tokens = max(1, sum(len(t.split()) for t in texts))
        user_text = next(
            (
                t
                for m, t in zip(reversed(messages), reversed(texts), strict=True)
                if m.get("role") == "user"
            ),
            "",
        )
        limit = _limit(body, "max_completion_tokens", "max_tokens")
        tool = _tool_name(body, user_text) if messages[-1].get("role") == "user" else None
        cid, created = self.new_id("chatcmpl-"), int(time.time())
        if tool:
            arguments = orjson.dumps(_tool_input(user_text)).decode()
            call_id = self.new_id("call_")
            completion_tokens, finish, text = _count(arguments), "tool_calls", None
        else:
            words, cut = _reply(user_text, ctl.words, limit)
            completion_tokens, finish, text = (
                len(words),
                "length" if cut else "stop",
                " ".join(words),
            )
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if body.get("stream") is not True:
            message: Json = {"role": "assistant", "content": text, "refusal": None}
            if tool:
                message["tool_calls"] = [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": tool, "arguments": arguments},
                    }
                ]
            return _json(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "system_fingerprint": _FINGERPRINT,
                    "choices": [
                        {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
                    ],
                    "usage": usage,
                }
            )
        include_usage = _include_usage(body)
        head, tail = _chunk_frame(cid, "chat.completion.chunk", created, model, include_usage)
        choice_tail = b',"logprobs":null,"finish_reason":null}' + tail

        def choice(delta: Json) -> bytes:
            return head + b'{"index":0,"delta":' + orjson.dumps(delta) + choice_tail

        if tool:
            start = {"index": 0, "id": call_id, "type": "function"}
            events = [
                choice(
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{**start, "function": {"name": tool, "arguments": ""}}],
                    }
                ),
                *(
                    choice({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                    for piece in _split(arguments)
                ),
            ]
        else:
            pre = head + b'{"index":0,"delta":{"content":'
            post = b"}" + choice_tail
            events = [choice({"role": "assistant", "content": "", "refusal": None})]
            events.extend(pre + orjson.dumps(p) + post for p in _pieces(words))
        last = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}
        events.append(head + orjson.dumps(last) + tail)
        if include_usage:
            events.append(head + b'],"usage":' + orjson.dumps(usage) + b"}\n\n")
        events.append(_DONE)
        return await _stream(request, events, ctl)

    async def completions(
        self, request: web.Request, body: Json, ctl: _Controls
    ) -> web.StreamResponse:
        model = _model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            prompts = [" ".join(map(str, prompt))]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            prompts = [" ".join(map(str, p)) for p in prompt]
        else:
            raise _BadRequest("'prompt' must be a string, array of strings or tokens", "prompt")
        limit = _limit(body, "max_tokens")
        replies = [_reply(p, ctl.words, limit) for p in prompts]
        prompt_tokens = max(1, sum(len(p.split()) for p in prompts))
        completion_tokens = sum(len(words) for words, _ in replies)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        cid, created = self.new_id("cmpl-"), int(time.time())
        finishes = ["length" if cut else "stop" for _, cut in replies]
        if body.get("stream") is not True:
            choices = [
                {"text": " ".join(w), "index": i, "logprobs": None, "finish_reason": f}
                for i, ((w, _), f) in enumerate(zip(replies, finishes, strict=True))
            ]
            return _json(
                {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "system_fingerprint": _FINGERPRINT,
                    "choices": choices,
                    "usage": usage,
                }
            )
        include_usage = _include_usage(body)
        head, tail = _chunk_frame(cid, "text_completion", created, model, include_usage)
        events: list[bytes] = []
        for i, ((words, _), finish) in enumerate(zip(replies, finishes, strict=True)):
            post = b',"index":%d,"logprobs":null,"finish_reason":null}' % i + tail
            events.extend(head + b'{"text":' + orjson.dumps(p) + post for p in _pieces(words))
            last = {"text": "", "index": i, "logprobs": None, "finish_reason": finish}
            events.append(head + orjson.dumps(last) + tail)
        if include_usage:
            events.append(head + b'],"usage":' + orjson.dumps(usage) + b"}\n\n")
        events.append(_DONE)
        return await _stream(request, events, ctl)

    async def embeddings(
        self, request: web.Request, body: Json, ctl: _Controls
    ) -> web.StreamResponse:
        model = _model(body)
        raw = body.get("input")
        keys: list[str]
        if isinstance(raw, str):
            keys, tokens = [raw], _count(raw)
        elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
            keys, tokens = raw, sum(_count(x) for x in raw)
        elif isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
            keys, tokens = ["\0tokens:" + ",".join(map(str, raw))], len(raw)
        elif (
            isinstance(raw, list)
            and raw
            and all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in raw)
        ):
            keys = ["\0tokens:" + ",".join(map(str, x)) for x in raw]
            tokens = sum(max(1, len(x)) for x in raw)
        else:
            raise _BadRequest("'input' must be a string, array of strings or tokens", "input")
        dim = body.get("dimensions", 8)
        if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= _MAX_DIMENSIONS:
            raise _BadRequest("'dimensions' must be a positive integer", "dimensions")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise _BadRequest("'encoding_format' must be 'float' or 'base64'", "encoding_format")
        slot = 1 if fmt == "base64" else 0
        data = [
            {"object": "embedding", "index": i, "embedding": _vector(key, dim)[slot]}
            for i, key in enumerate(keys)
        ]
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
        model = _model(body)
        if body.get("max_tokens") is None:
            raise _BadRequest("max_tokens: Field required")
        limit = _limit(body, "max_tokens")
        messages = _messages(body)
        texts = [_text(body.get("system")), *(_text(m.get("content")) for m in messages)]
        input_tokens = max(1, sum(len(t.split()) for t in texts))
        last = messages[-1]
        content = last.get("content")
        is_tool_result = isinstance(content, list) and any(
            isinstance(b, dict) and b.get("type") == "tool_result" for b in content
        )
        user_text = next(
            (_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
        )
        tool = None
        if last.get("role") == "user" and not is_tool_result:
            tool = _tool_name(body, user_text)
        mid = self.new_id("msg_")
        if tool:
            tool_input = _tool_input(user_text)
            partial = orjson.dumps(tool_input).decode()
            block: Json = {
                "type": "tool_use",
                "id": self.new_id("toolu_"),
                "name": tool,
                "input": tool_input,
            }
            output_tokens, stop = _count(partial), "tool_use"
        else:
            words, cut = _reply(user_text, ctl.words, limit)
            block = {"type": "text", "text": " ".join(words)}
            output_tokens, stop = len(words), "max_tokens" if cut else "end_turn"
        usage = {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
        message: Json = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [block],
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": usage,
        }
        if body.get("stream") is not True:
            return _json(message)
        start = {
            **message,
            "content": [],
            "stop_reason": None,
            "usage": {**usage, "output_tokens": 1},
        }
        if tool:
            opening = {**block, "input": {}}
            deltas = [_A_JSON_PRE + orjson.dumps(p) + _A_DELTA_POST for p in ["", *_split(partial)]]
        else:
            opening = {"type": "text", "text": ""}
            deltas = [_A_TEXT_PRE + orjson.dumps(p) + _A_DELTA_POST for p in _pieces(words)]
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
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": output_tokens},
                },
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
        """Zero the counters and the fail-times budgets (in_flight tracks live requests)."""
        self.requests = 0
        self.by_path.clear()
        self.failures.clear()
        return _json({"ok": True})

    async def last_request(self, request: web.Request) -> web.Response:
        """The last /v1 request; header names are lower-cased so tests can look them up."""
        if self.last is None:
            return _json({"path": None, "headers": {}, "body": None})
        path, headers, body = self.last
        return _json(
            {"path": path, "headers": {k.lower(): v for k, v in headers.items()}, "body": body}
        )


def _include_usage(body: Json) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _chunk_frame(
    cid: str, obj: str, created: int, model: str, include_usage: bool
) -> tuple[bytes, bytes]:
    """The bytes around a chunk's choices, shared by every event of one OpenAI stream."""
    fixed = orjson.dumps(
        {
            "id": cid,
            "object": obj,
            "created": created,
            "model": model,
            "system_fingerprint": _FINGERPRINT,
        }
    )
    head = b"data: " + fixed[:-1] + b',"choices":['
    return head, b"]" + (b',"usage":null' if include_usage else b"") + b"}\n\n"


def _sse(event: bytes, data: Json) -> bytes:
    return b"event: " + event + b"\ndata: " + orjson.dumps(data) + b"\n\n"


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
    """Run the emulator until interrupted (SIGINT/SIGTERM), on uvloop when available."""
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


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Tollway upstream provider emulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    serve(args.host, args.port, args.api_key)
