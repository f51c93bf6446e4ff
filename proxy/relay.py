"""The response side: relay a provider reply (whole or streamed), a local Reply, or an error.

Streams are relayed event by event as they arrive (one socket write per upstream read); JSON is
parsed only where needed: the few events carrying usage, every event when translating between
dialects, and every event only if some plugin implements ``response_chunk`` for the request's
endpoint (``proxy.hookspecs.endpoints``) and either is not ``@on_demand`` or asked for this
request's events (``ctx.parse_events``). Responses are written and finished here, before
``log`` hooks run, so logging never delays a reply.

A response-side hook that raises (anything but a Reject) turns the reply into a 500
``internal_error``; on the way to an error reply hooks cannot stop it: a failure there is
logged and the provider-shaped error still goes out.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from aiohttp import web

from proxy import responses_api, sse, translate
from proxy.chain import Chain, Hook
from proxy.context import (
    STREAM_BROKEN,
    UNBILLED_ENDPOINTS,
    Reply,
    RequestContext,
    Route,
    StashKey,
    StreamEvent,
    UpstreamResponse,
)
from proxy.errors import (
    TRANSLATION_ERRORS,
    Reject,
    convert_error,
    error_body,
    reject_body,
    untranslatable_reply,
)
from proxy.failurelog import ErrorLog
from proxy.tokens import (
    Tokens,
    count_reply_tokens,
    openai_chunk_tokens,
    openai_tokens,
    read_anthropic_event,
    reply_tokens,
)
from proxy.upstream import UPSTREAM_ID

log = logging.getLogger("tollway")
HOOK_ERRORS = ErrorLog(log)
"""Failing response-side hooks: a tenant can make every request fail a plugin's hook, so
each (plugin, hook, exception type) is logged with its traceback once, then counted."""

_JSON = "application/json"
_FAILED: StashKey[set[str]] = StashKey()
"""The plugins whose response-side hook raised in this request: each is logged once, though
the error reply runs its hooks again."""
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def base_headers(ctx: RequestContext) -> dict[str, str]:
    """The core's own reply headers, derived from the context's facts; plugins add theirs in
    ``response_headers`` hooks, the one way (see ``proxy.hookspecs``).

    The request id is the gateway's in both SDKs' header: ``X-Request-Id`` (the OpenAI SDK's
    ``_request_id``) and, for an Anthropic client, ``request-id`` (its SDK's). The provider's
    id of the call that answered goes as ``X-Upstream-Request-Id`` (``upstream.relay_headers``).
    """
    headers = {"X-Request-Id": ctx.request_id}
    if ctx.dialect == "anthropic":
        headers["request-id"] = ctx.request_id
    if ctx.route is not None:
        headers["X-Tollway-Model"] = ctx.route.model
    if ctx.cache is not None:
        headers["X-Tollway-Cache"] = ctx.cache
    return headers


def _hook_failed(chain: Chain, ctx: RequestContext, hook: Hook) -> None:
    """Log a hook's exception (being handled) at most once per request and plugin, and
    without flooding (``HOOK_ERRORS``): the first of a kind with the plugin, the hook, the
    request id and the traceback; later ones as one line per interval with their count and
    the latest request id. Never the request or reply body, nor the exception's message."""
    name = chain.name_of(hook)
    failed = ctx.stash.get(_FAILED)
    if failed is None:
        failed = ctx.stash[_FAILED] = set()
    if name in failed:
        return
    failed.add(name)
    hook_name = getattr(hook, "__name__", "hook")
    HOOK_ERRORS.exception(
        f"{name}.{hook_name}",
        "plugin %s failed in %s for request %s",
        name,
        hook_name,
        ctx.request_id,
    )


def _internal(chain: Chain, ctx: RequestContext, hook: Hook) -> Reject:
    """The 500 a failing hook turns its reply into (logged here, so the handler does not)."""
    _hook_failed(chain, ctx, hook)
    return Reject(500, "internal gateway error", code="internal_error")


async def _run_header_hooks(
    chain: Chain, ctx: RequestContext, headers: dict[str, str], stop_at: int
) -> None:
    for position, hook in chain.response_headers:
        if position < stop_at:
            try:
                await hook(ctx, headers)
            except Reject:
                raise
            except Exception:
                raise _internal(chain, ctx, hook) from None


async def _complete(chain: Chain, ctx: RequestContext) -> None:
    for hook in chain.response_complete:
        try:
            await hook(ctx)
        except Reject:
            raise
        except Exception:
            raise _internal(chain, ctx, hook) from None


async def _body_hooks(
    chain: Chain, ctx: RequestContext, body: Any, stop_at: int
) -> tuple[Any, bool]:
    """Run ``response_body`` of the plugins above ``stop_at``: the body, and whether one
    replaced it."""
    changed = False
    for position, hook in chain.response_body:
        if position < stop_at:
            try:
                new = await hook(ctx, body)
            except Reject:
                raise
            except Exception:
                raise _internal(chain, ctx, hook) from None
            if new is not None:
                body, changed = new, True
    return body, changed


_TERMINAL_FRAMES = (b"data: [DONE]", b"event: message_stop", *responses_api.TERMINAL_FRAMES)


def _terminal(frame: bytes) -> bool:
    """The last event of a stream: held back until ``response_complete`` ran."""
    return frame.startswith(_TERMINAL_FRAMES)


async def _finish(
    ctx: RequestContext, status: int, body: bytes, headers: dict[str, str]
) -> web.Response:
    headers["Content-Type"] = _JSON
    resp = web.Response(body=body, status=status, headers=headers)
    await resp.prepare(ctx.request)
    ctx.timings.first_byte = time.perf_counter()
    await resp.write_eof()
    return resp


async def send_error(chain: Chain, ctx: RequestContext, exc: Reject) -> web.StreamResponse:
    """A provider-shaped error reply; headers of the Reject (Retry-After) are kept."""
    ctx.status = exc.status
    ctx.error_code = exc.code or ctx.error_code or f"http_{exc.status}"
    ctx.error_message = exc.message
    headers = base_headers(ctx)
    headers.update(exc.headers)
    # Every hook runs, and none can replace this reply: a hook that raises (even a Reject) is
    # logged and its header edits are undone, so the client still gets the provider's shape.
    for _, hook in chain.response_headers:
        before = dict(headers)
        try:
            await hook(ctx, headers)
        except Exception:
            _hook_failed(chain, ctx, hook)
            headers = before
    for hook in chain.response_complete:
        try:
            await hook(ctx)
        except Exception:
            _hook_failed(chain, ctx, hook)
    return await _finish(ctx, exc.status, reject_body(exc, ctx.dialect), headers)


def _set_usage(ctx: RequestContext, tokens: Tokens | None, final: bool = True) -> None:
    if tokens is not None:
        ctx.usage.input_tokens, ctx.usage.output_tokens = tokens
        ctx.usage.reported = True
        ctx.usage.final = ctx.usage.final or final


_ANTHROPIC_ENDS = ("message_start", "message_delta")
"""The Anthropic events naming the reply (model, id) and why it stopped: parsed anyway."""


def _anthropic_end(ctx: RequestContext, name: str | None, event: Any) -> None:
    """The served model and id (message_start) or the stop reason (message_delta)."""
    if name == "message_start":
        msg = event.get("message")
        if isinstance(msg, dict):
            model, rid = msg.get("model"), msg.get("id")
            if isinstance(model, str):
                ctx.response_model = model
            if isinstance(rid, str):
                ctx.response_id = rid
    elif name == "message_delta":
        delta = event.get("delta")
        reason = delta.get("stop_reason") if isinstance(delta, dict) else None
        if isinstance(reason, str):
            ctx.finish_reasons = (reason,)


def _openai_end(ctx: RequestContext, chunk: Any) -> None:
    """A parsed chat chunk that ends a choice: its finish reason, the model and the id."""
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    if not choices:
        return
    for choice in choices:
        reason = choice.get("finish_reason") if isinstance(choice, dict) else None
        if isinstance(reason, str):
            ctx.finish_reasons += (reason,)
            model, rid = chunk.get("model"), chunk.get("id")
            if isinstance(model, str):
                ctx.response_model = model
            if isinstance(rid, str):
                ctx.response_id = rid


_END_BYTES = 4096
"""Bytes searched for the finish chunk at the end of an unparsed stream."""


def _raw_ends(ctx: RequestContext, reads: tuple[bytes, ...]) -> None:
    """The finish reasons, model and id of an unparsed OpenAI stream, from its last reads.

    The choice's final chunk follows its content, then only the usage chunk and ``[DONE]``
    come, so they are in the last reads even of a stream paced one event per read. Only their
    last ``_END_BYTES`` are searched, from the end, in C (``rfind``), stopping at the first
    ``"finish_reason": null``: an unpaced stream arrives in a few large reads, and looking at
    each of its lines (or all its bytes) cost a relayed stream 3-10 % more instructions. A
    final chunk longer than that is missed: finish reasons are for traces, not billing. A
    request for several choices (``n``) is read per event instead (``_StreamState.
    process_choices``): one choice may end long before the others' last content.
    """
    window = _END_BYTES
    tail = b"".join([r[-window:] for r in reads])[-window:]
    found: list[bytes] = []
    end = len(tail)
    while (i := tail.rfind(b'"finish_reason"', 0, end)) >= 0:
        if tail[i + 15 : i + 24].lstrip(b": ").startswith(b"null"):
            break
        start = tail.rfind(b"\n", 0, i) + 1
        stop = tail.find(b"\n", i)
        found.append(tail[start : stop if stop >= 0 else len(tail)])
        end = start
    for line in reversed(found):
        if line.startswith(b"data:"):
            try:
                chunk = orjson.loads(line[5:])
            except orjson.JSONDecodeError:  # cut at the start of ``tail``
                continue
            _openai_end(ctx, chunk)


async def relay_body(
    chain: Chain, ctx: RequestContext, route: Route, resp: UpstreamResponse
) -> web.Response:
    """A whole provider reply: usage read, translated if needed, hooks run, sent once."""
    raw = resp.body or b""
    status = ctx.status = resp.status
    headers = base_headers(ctx)
    headers.update(resp.headers)
    ctx.upstream_request_id = resp.headers.get(UPSTREAM_ID)
    headers.pop("content-type", None)
    if status >= 300:
        ctx.error_code = f"upstream_{status}"
        raw = convert_error(raw, status, route.kind, ctx.dialect)
        if status < 400:
            status = 502
    else:
        headers.pop("retry-after", None)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            raise Reject(
                502, "upstream provider returned a malformed reply", code="upstream_invalid"
            )
        tokens = reply_tokens(data, route.kind)
        if tokens is None and ctx.endpoint in UNBILLED_ENDPOINTS:  # a count: no usage object
            tokens = count_reply_tokens(data)
        _set_usage(ctx, tokens)
        changed = False
        if ctx.endpoint == "responses":  # passed through or translated: proxy.responses_api
            data, changed = responses_api.whole_reply(ctx, route, data)
        elif ctx.endpoint == "input_tokens":  # proxy.input_tokens: Anthropic's count reshaped
            changed = route.kind == "anthropic"
            if changed:
                data = responses_api.count_reply(ctx.usage.input_tokens)
        elif route.kind != ctx.dialect:
            fn = (
                translate.messages_response_to_chat
                if ctx.dialect == "openai"
                else translate.chat_response_to_messages
            )
            try:
                data = fn(data, ctx.model)
            except TRANSLATION_ERRORS:
                raise untranslatable_reply() from None
            changed = True
        if chain.response_body:
            data, edited = await _body_hooks(chain, ctx, data, len(chain.plugins))
            changed = changed or edited
        if changed:
            raw = orjson.dumps(data)
    ctx.status = status
    if chain.response_headers:  # no coroutine per phase without hooks
        await _run_header_hooks(chain, ctx, headers, len(chain.plugins))
    if chain.response_complete:
        await _complete(chain, ctx)
    return await _finish(ctx, status, raw, headers)


async def send_reply(
    chain: Chain, ctx: RequestContext, reply: Reply, stop_at: int
) -> web.StreamResponse:
    """A local answer from ``access`` at position ``stop_at`` (a cache hit, a plugin's reply).

    Only plugins above ``stop_at`` see the response side, as if the plugin were the provider.
    """
    ctx.status = reply.status
    headers = base_headers(ctx)
    headers.update(reply.headers)
    await _run_header_hooks(chain, ctx, headers, stop_at)
    await _complete(chain, ctx)
    if reply.events is not None and ctx.stream:
        resp = web.StreamResponse(status=reply.status, headers={**headers, **_SSE_HEADERS})
        await resp.prepare(ctx.request)
        ctx.timings.first_byte = time.perf_counter()
        await resp.write(b"".join(reply.events))
        await resp.write_eof()
        return resp
    body = reply.body
    if isinstance(body, dict) and chain.response_body:
        body, _ = await _body_hooks(chain, ctx, body, stop_at)
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return await _finish(ctx, reply.status, raw, headers)


class _StreamState(responses_api.ResponsesEvents):
    """Per-stream translation and usage bookkeeping, chosen once per stream."""

    __slots__ = (
        "chain",
        "ctx",
        "ended",
        "hooks",
        "route",
        "sent_error",
        "to_chat",
        "to_messages",
        "to_responses",
        "unparsed_openai",
        "wants_usage",
    )

    def __init__(self, chain: Chain, ctx: RequestContext, route: Route, wants_usage: bool) -> None:
        self.chain = chain
        self.ctx = ctx
        self.ended = False  # the provider's terminal event arrived: the stream is complete
        self.sent_error = False  # the provider's own error event went to the client
        self.route = route
        self.wants_usage = wants_usage
        # on-demand hooks only (a cache bypassing this request): the events stay unparsed
        self.hooks = chain.response_chunk if chain.chunks_always or ctx.parse_events else ()
        self.to_chat = (
            # always with usage: hooks (a cache assembling the reply) need it; the usage chunk
            # is withheld below from a client that did not ask for it
            translate.MessagesStreamToChat(ctx.model, True)
            if route.kind == "anthropic" and ctx.dialect == "openai"
            else None
        )
        self.to_messages = (
            translate.ChatStreamToMessages(ctx.model)
            if route.kind == "openai" and ctx.dialect == "anthropic"
            else None
        )
        self.to_responses = (  # /v1/responses on a translated route: chat -> Responses events
            self.responses_translator(ctx, route) if ctx.endpoint == "responses" else None
        )
        # OpenAI events relayed as they came (``process``'s last branch): no event is parsed
        # for its finish reason; ``_raw_ends`` reads the last reads once the stream ended
        self.unparsed_openai = (
            not self.hooks
            and route.kind != "anthropic"
            and self.to_messages is None
            and self.to_responses is None
            and ctx.endpoint != "responses"
        )

    def _emit(self, data: Any, name: str | None, out: list[bytes], withhold: bool = False) -> None:
        """Run the chunk hooks, then send the event unless dropped or ``withhold``-en (a usage
        chunk the client did not ask for: hooks still see it)."""
        if self.hooks:
            ev = StreamEvent(name=name, data=data)
            for _, hook in self.hooks:
                try:
                    hook(self.ctx, ev)
                except Reject:
                    raise
                except Exception:  # a plugin's fault, not a malformed stream: a 500 event
                    raise _internal(self.chain, self.ctx, hook) from None
            if ev.drop:
                return
            data = ev.data
        if not withhold:
            out.append(sse.frame_json(data, name))

    def process_choices(self, raw: bytes, out: list[bytes]) -> None:
        """``process``, then the finish reason of an unparsed event that ends a choice: a
        stream of several choices (``n``) may end one long before its last reads, where
        ``_raw_ends`` looks. Chosen per stream, so a stream of one choice pays nothing."""
        self.process(raw, out)
        i = raw.find(b'"finish_reason"')
        if i >= 0 and not raw[i + 15 : i + 24].lstrip(b": ").startswith(b"null"):
            try:
                _openai_end(self.ctx, orjson.loads(sse.parse_event(raw)[1]))
            except orjson.JSONDecodeError:  # relayed as it came; a trace detail is all it costs
                pass

    def process(self, raw: bytes, out: list[bytes]) -> None:
        """Turn one provider event into zero or more client frames appended to ``out``."""
        name, data = sse.parse_event(raw)
        ctx = self.ctx
        ctx.usage.events += 1
        if name is not None:  # Anthropic's events are named, OpenAI's are not
            if name == "message_stop":
                self.ended = True
            elif name == "error":
                self.sent_error = self.to_chat is None  # translated, it raises StreamError
        elif data == sse.DONE:
            self.ended = True
        if self.to_chat is not None:
            if name is None and not data:
                return
            final = name == "message_delta"
            event = orjson.loads(data)
            if name in _ANTHROPIC_ENDS:
                _anthropic_end(ctx, name, event)
            for chunk in self.to_chat.feed(name, event):
                usage_only = not chunk.get("choices") and chunk.get("usage") is not None
                if not usage_only or self.wants_usage:
                    if not self.wants_usage:
                        chunk.pop("usage", None)  # not asked for: not even "usage": null
                    self._emit(chunk, None, out)
                elif self.hooks:
                    self._emit(chunk, None, out, withhold=True)
            _set_usage(ctx, self.to_chat.usage, final)
            return
        if self.to_messages is not None:
            final = False
            if data == sse.DONE:
                for ev_name, ev in self.to_messages.finish():
                    self._emit(ev, ev_name, out)
            elif data:
                chunk = orjson.loads(data)
                final = isinstance(chunk.get("usage"), dict)
                _openai_end(ctx, chunk)
                for ev_name, ev in self.to_messages.feed(chunk):
                    self._emit(ev, ev_name, out)
            _set_usage(ctx, self.to_messages.usage, final)
            return
        obj: Any = None  # the event parsed, at most once
        if self.route.kind == "anthropic":
            if name in ("message_start", "message_delta"):
                obj = orjson.loads(data)
                _anthropic_end(ctx, name, obj)
                u = ctx.usage
                if read_anthropic_event(name, obj, u):
                    u.reported = True
                    if name == "message_delta":  # message_start's output is a placeholder
                        u.final = True
        elif data != sse.DONE:
            if self.hooks:
                obj = orjson.loads(data)
                _openai_end(ctx, obj)
                usage = obj.get("usage")
                if isinstance(usage, dict):
                    _set_usage(ctx, openai_tokens(usage))
                    if not self.wants_usage and not obj.get("choices"):
                        self._emit(obj, name, out, withhold=True)
                        return
            else:
                tokens = openai_chunk_tokens(data)
                if tokens is not None:
                    _set_usage(ctx, tokens)
                    if not self.wants_usage and sse.is_usage_only_chunk(data):
                        return
        if self.hooks and data != sse.DONE and data:
            self._emit(obj if obj is not None else orjson.loads(data), name, out)
        else:
            out.append(raw + b"\n\n")


async def relay_stream(
    chain: Chain, ctx: RequestContext, route: Route, resp: UpstreamResponse, wants_usage: bool
) -> web.StreamResponse:
    """Relay a provider stream event by event; a failure mid-stream becomes an error event.

    A stream that fails after its 200 went out (the provider's connection breaks or times out,
    an event is malformed, the provider sends an error event or stops before its terminal
    event) ends with a provider-shaped error event, never with a clean finish, and is recorded
    as failed: ``ctx.status`` becomes the failure's status and ``ctx.error_code``
    ``STREAM_BROKEN`` (see ``proxy.context``).
    """
    assert resp.chunks is not None
    ctx.status = resp.status
    ctx.upstream_request_id = upstream_id = resp.headers.get(UPSTREAM_ID)
    headers = base_headers(ctx)
    headers.update(_SSE_HEADERS)
    if upstream_id is not None:
        headers[UPSTREAM_ID] = upstream_id
    if chain.response_headers:
        await _run_header_hooks(chain, ctx, headers, len(chain.plugins))
    out = web.StreamResponse(status=resp.status, headers=headers)
    await out.prepare(ctx.request)
    state = _StreamState(chain, ctx, route, wants_usage)
    process = state.process_responses if ctx.endpoint == "responses" else state.process
    if state.unparsed_openai and ctx.body.get("n") not in (None, 1):
        state.unparsed_openai = False  # several choices: each one's end read as it passes
        process = state.process_choices
    splitter = sse.EventSplitter()
    frames: list[bytes] = []
    held: list[bytes] = []  # the terminal event, sent after response_complete
    # the last four reads: an unparsed stream's finish reasons are there (locals: each read
    # costs a few instructions, where even a substring test per event cost ~6 % of a stream)
    r3 = r2 = r1 = b""
    try:
        async for chunk in resp.chunks:
            r3, r2, r1 = r2, r1, chunk
            for raw in splitter.feed(chunk):
                process(raw, frames)
            if held:  # anything after a terminal event: it was not the end after all
                frames[:0] = held
                held.clear()
            if frames and _terminal(frames[-1]):
                held.append(frames.pop())
            if frames:
                if not ctx.timings.first_byte:
                    ctx.timings.first_byte = time.perf_counter()
                await out.write(b"".join(frames))
                frames.clear()
        tail = splitter.rest().strip()
        if tail:
            process(tail, frames)
        if not state.ended:  # the provider closed cleanly, but not at the end of its reply
            if frames:
                await out.write(b"".join(frames))
                frames.clear()
            raise Reject(
                502,
                f"upstream provider {route.provider} ended the stream before its end",
                code=STREAM_BROKEN,
            )
        if state.to_chat is not None and state.to_responses is None:
            frames.append(sse.frame(sse.DONE))
        if state.unparsed_openai:
            _raw_ends(ctx, (r3, r2, r1))
        frames[:0] = held
        if chain.response_complete:
            await _complete(chain, ctx)
        if frames:
            await out.write(b"".join(frames))
    except (
        Reject,
        translate.StreamError,
        orjson.JSONDecodeError,
        TypeError,
        ValueError,
        KeyError,
        AttributeError,
        IndexError,
    ) as e:
        status = e.status if isinstance(e, Reject) else 502
        message = e.message if isinstance(e, Reject | translate.StreamError) else "malformed stream"
        # the client saw a 200; the row, the quota and the metrics see what really happened
        ctx.status = status
        code = e.code if isinstance(e, Reject) else None
        own = code is not None and not code.startswith("upstream")  # a plugin's refusal
        ctx.error_code = code if own else STREAM_BROKEN
        ctx.error_message = message
        if not state.sent_error:  # the provider's own error event already told the client
            if ctx.endpoint == "responses":
                await out.write(state.responses_error(message, ctx.error_code))
            else:
                body = error_body(ctx.dialect, status, message, code=ctx.error_code)
                frame = sse.frame_json(body, "error" if ctx.dialect == "anthropic" else None)
                await out.write(frame)
    await out.write_eof()
    return out
