"""The spans of one request, recorded as plain values and built once, after the reply.

Imported only when a chain enables the otel plugin (``OtelPlugin.__init__``), so a gateway
without it never loads the SDK. Spans follow the OpenTelemetry GenAI semantic conventions:

- the request: a SERVER span ``{operation} {requested model}`` (``chat gpt-5.4-mini``), a child
  of the client's W3C ``traceparent`` when it sends one;
- the provider call: a CLIENT span ``{operation} {upstream model}`` per route tried (a fallback
  gets its own span; the one it replaced ends in error), whose context is passed to the
  provider as ``traceparent``; the core's retries are counted on it (``tollway.retries``);
- a stream: a ``stream`` span from the provider's headers to the last byte, with a
  ``first_byte`` event (time to first byte);
- the phases the core and plugins recorded (``ctx.timings.phase``: a limits queue wait, a
  cache lookup, a provider try that was retried): an INTERNAL span each, with its own times.

Why not the SDK's ``Tracer``: ``start_span``/``set_attribute`` validate and copy every
attribute under a lock, and that cost most of the plugin's time on the event loop. During the
request the hooks only note perf_counter readings and values in a slotted ``Trace``; the
``log`` hook, after the last byte, builds ``ReadableSpan`` objects with plain attribute dicts
(every value here is a str, bool, int, float or a list of str) and hands them to the
``BatchSpanProcessor``, whose own thread encodes and exports them. Sampling keeps the SDK's
``ParentBased(TraceIdRatioBased)`` rule: a client's sampled flag is followed, a new trace is
kept when its id falls under the ratio's bound; an unsampled request only passes on a
traceparent (flag 00) and builds nothing.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import orjson
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from plugins.otel.config import OtelConfig
from plugins.otel.export import exporter
from proxy.context import RequestContext, StashKey, UpstreamRequest

OPERATIONS = {
    "chat": "chat",
    "messages": "chat",
    "responses": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "count_tokens": "count_tokens",
    "input_tokens": "count_tokens",
}
"""GenAI ``gen_ai.operation.name`` of each client endpoint (the token counts have none)."""

_PARAMS = (
    ("max_tokens", "gen_ai.request.max_tokens"),
    ("max_completion_tokens", "gen_ai.request.max_tokens"),
    ("max_output_tokens", "gen_ai.request.max_tokens"),
    ("temperature", "gen_ai.request.temperature"),
    ("top_p", "gen_ai.request.top_p"),
)
_TRACEPARENT = re.compile(r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
"""W3C trace context, as the SDK's propagator reads it."""
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)
_ATTR_TYPES = (str, bool, int, float)


class Call:
    """One provider call (a route tried): its span id, times and attributes."""

    __slots__ = ("attrs", "end", "error", "span_id", "start", "status")

    def __init__(self, span_id: int, start: float, attrs: dict[str, Any] | None) -> None:
        self.span_id = span_id
        self.start = start
        self.end = 0.0
        self.attrs = attrs
        self.error: str | None = None
        self.status = 0  # the provider's, when it answered (a stream may fail later)


class Trace:
    """One request's trace context and what its spans will say (kept in ``ctx.stash``).

    ``attrs`` is None for an unsampled request: nothing is recorded, only propagated.
    """

    __slots__ = (
        "attrs",
        "calls",
        "events",
        "parent",
        "sampled",
        "span_id",
        "state",
        "stream",
        "trace_id",
    )

    def __init__(
        self, trace_id: int, span_id: int, parent: int, sampled: bool, state: str | None
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent = parent  # the client's span id, 0 for a new trace
        self.sampled = sampled
        self.state = state  # the client's tracestate header, passed on as it came
        self.attrs: dict[str, Any] | None = None
        self.calls: list[Call] = []
        self.events: list[tuple[str, float, dict[str, Any]]] = []  # (name, perf, attrs)
        self.stream = 0.0  # perf_counter when a stream's headers came

    def open_call(self) -> Call | None:
        calls = self.calls
        return calls[-1] if calls and not calls[-1].end else None


TRACE: StashKey[Trace] = StashKey()


class Traces:
    """Records requests' traces and owns the exporter."""

    def __init__(self, config: OtelConfig) -> None:
        self.config = config
        self.resource = Resource.create({"service.name": config.service_name})
        self.scope = InstrumentationScope("tollway")
        self.processor = BatchSpanProcessor(
            exporter(config, self.resource, self.scope.name),
            max_queue_size=config.max_queue_size,
            # the SDK's default batch (512) may not exceed the queue: a smaller queue is valid
            max_export_batch_size=min(512, config.max_queue_size),
            schedule_delay_millis=config.schedule_delay * 1000,
            export_timeout_millis=config.export_timeout * 1000,
        )
        self.ids = RandomIdGenerator()
        self.bound = TraceIdRatioBased.get_bound_for_rate(config.sample_ratio)
        # per-request work done once: a provider's host, a user's hash (both bounded)
        self.hosts: dict[str, str] = {}
        self.users: dict[str, str] = {}

    def shutdown(self) -> None:
        """Export what is queued and stop the exporter's thread, within ``export_timeout``
        (blocking: run it off-loop).

        The SDK's shutdown waits up to 30 s, one ``export_timeout`` per batch still queued
        after the export under way: with a collector that hangs, a gateway stopping would wait
        that long (past a usual 30 s grace period). It runs in a daemon thread, given
        ``export_timeout``; what is not exported by then is dropped with the process."""
        stop = threading.Thread(target=self.processor.shutdown, name="otel-shutdown", daemon=True)
        stop.start()
        stop.join(self.config.export_timeout)

    def begin(self, ctx: RequestContext) -> Trace:
        """The request's trace: the client's (its sampled flag followed) or a new one."""
        headers = ctx.request.headers
        found = _TRACEPARENT.fullmatch(headers.get("traceparent", ""))
        trace_id = parent = 0
        sampled = False
        if found is not None:
            version, tid, sid, flags, rest = found.groups()
            if version != "ff" and not (version == "00" and rest):
                trace_id, parent = int(tid, 16), int(sid, 16)
                sampled = bool(int(flags, 16) & 1)
        if not trace_id or not parent:  # none, or invalid: a new trace, sampled by ratio
            trace_id, parent = self.ids.generate_trace_id(), 0
            sampled = (trace_id & TraceIdRatioBased.TRACE_ID_LIMIT) < self.bound
        state = headers.get("tracestate") if parent else None
        trace = ctx.stash[TRACE] = Trace(
            trace_id, self.ids.generate_span_id(), parent, sampled, state
        )
        if not sampled:
            return trace
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": OPERATIONS.get(ctx.endpoint, ctx.endpoint),
            "http.request.method": ctx.request.method,
            "url.path": ctx.request.path,
            "tollway.request_id": ctx.request_id,
            "tollway.endpoint": ctx.endpoint,
        }
        if ctx.model:
            attrs["gen_ai.request.model"] = ctx.model
        body = ctx.body
        if body:
            attrs["tollway.stream"] = ctx.stream
            for field, name in _PARAMS:
                value = body.get(field)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    attrs[name] = value
            if self.config.capture_content:
                attrs["gen_ai.input.messages"] = _content(body)
        trace.attrs = attrs
        return trace

    def provider_call(self, ctx: RequestContext, req: UpstreamRequest) -> None:
        """Note a provider call's start and pass its span's context to the provider."""
        trace = ctx.stash.get(TRACE) or self.begin(ctx)
        now = time.perf_counter()
        failed = trace.open_call()
        if failed is not None:  # a fallback replaces the call that failed
            failed.end = now
            failed.error = "fallback"
            if trace.attrs is not None:
                trace.events.append(("fallback", now, {"tollway.provider": req.provider}))
        span_id = self.ids.generate_span_id()
        attrs: dict[str, Any] | None = None
        if trace.attrs is not None:
            route = ctx.route
            attrs = {
                "gen_ai.operation.name": trace.attrs["gen_ai.operation.name"],
                "gen_ai.provider.name": req.kind,
                "gen_ai.system": req.kind,
                "gen_ai.request.model": route.upstream_model if route is not None else "",
                "server.address": self._host(req.url),
                "tollway.provider": req.provider,
            }
        trace.calls.append(Call(span_id, now, attrs))
        flags = "01" if trace.sampled else "00"
        req.headers["traceparent"] = f"00-{trace.trace_id:032x}-{span_id:016x}-{flags}"
        if trace.state:
            req.headers["tracestate"] = trace.state

    def headers(self, ctx: RequestContext) -> None:
        """The provider answered (or failed): its call ends; a stream's span starts here."""
        trace = ctx.stash.get(TRACE)
        if trace is None or trace.attrs is None:
            return
        call = trace.open_call()
        if call is None:
            return
        call.end = now = time.perf_counter()
        call.status = ctx.status
        if ctx.stream and ctx.status < 300:
            trace.stream = now

    def body(self, ctx: RequestContext, body: dict[str, Any]) -> None:
        """A whole reply: the served model, finish reasons and (if asked) the completion."""
        trace = ctx.stash.get(TRACE)
        if trace is None or trace.attrs is None:
            return
        attrs = trace.attrs
        model = body.get("model")
        if isinstance(model, str):
            attrs["gen_ai.response.model"] = model
        reasons = _finish_reasons(body)
        if reasons:
            attrs["gen_ai.response.finish_reasons"] = reasons
        rid = body.get("id")
        if isinstance(rid, str):
            attrs["gen_ai.response.id"] = rid
        if self.config.capture_content:
            attrs["gen_ai.output.messages"] = _output(body)

    def finish(self, ctx: RequestContext) -> None:
        """After the last byte: every span of a sampled request built and queued for export."""
        trace = ctx.stash.get(TRACE) or self.begin(ctx)
        attrs = trace.attrs
        if attrs is None:
            return
        now = time.perf_counter()
        offset = time.time_ns() - int(now * 1e9)  # perf_counter -> wall-clock nanoseconds
        end = ctx.timings.end or now
        status = ctx.status
        state = TraceState.from_header([trace.state]) if trace.state else None
        this = SpanContext(trace.trace_id, trace.span_id, False, _SAMPLED, state)
        parent = (
            SpanContext(trace.trace_id, trace.parent, True, _SAMPLED, state)
            if trace.parent
            else None
        )
        on_end = self.processor.on_end
        for call in trace.calls:
            on_end(self._call(ctx, trace, call, this, state, offset, now))
        first = ctx.timings.first_byte
        if trace.stream:
            marks = (Event("first_byte", None, int(first * 1e9) + offset),) if first else ()
            on_end(self._span("stream", trace, this, state, trace.stream, end, offset, marks))
        for name, start, stop, extra in ctx.timings.phases or ():
            phase = self._span(name, trace, this, state, start, stop, offset, (), _clean(extra))
            on_end(phase)

        route = ctx.route
        if route is not None:
            attrs["tollway.model"] = route.model
            if not ctx.model:  # refused before the body was read: name the route at least
                attrs["gen_ai.request.model"] = route.model
            attrs["gen_ai.provider.name"] = route.kind
            attrs["gen_ai.system"] = route.kind
        if "gen_ai.response.model" not in attrs:
            model = ctx.response_model or (route.upstream_model if route is not None else None)
            if model:
                attrs["gen_ai.response.model"] = model
        if ctx.finish_reasons and "gen_ai.response.finish_reasons" not in attrs:
            attrs["gen_ai.response.finish_reasons"] = list(ctx.finish_reasons)
        if ctx.response_id and "gen_ai.response.id" not in attrs:
            attrs["gen_ai.response.id"] = ctx.response_id
        attrs["http.response.status_code"] = status
        usage = ctx.usage
        if usage.reported:
            attrs["gen_ai.usage.input_tokens"] = usage.input_tokens
            attrs["gen_ai.usage.output_tokens"] = usage.output_tokens
        if ctx.cache is not None:
            attrs["tollway.cache"] = ctx.cache
        if ctx.shared is not None:
            attrs["tollway.shared"] = ctx.shared
        if ctx.feature is not None:
            attrs["tollway.feature"] = ctx.feature
        if ctx.retries:
            attrs["tollway.retries"] = ctx.retries
        if first:
            attrs["tollway.ttfb_ms"] = round((first - ctx.timings.start) * 1000.0, 3)
        if ctx.upstream_request_id:
            attrs["tollway.upstream_request_id"] = ctx.upstream_request_id
        principal = ctx.principal
        if principal is not None:
            mode = self.config.user
            if mode == "hash":
                attrs["tollway.user"] = self._user_hash(principal.user_id)
            elif mode == "raw":
                attrs["tollway.user"] = principal.user_id
            if principal.tier is not None:
                attrs["tollway.tier"] = principal.tier
            if principal.key_id is not None:
                attrs["tollway.key_id"] = principal.key_id
        if ctx.error_code:
            attrs["error.type"] = ctx.error_code
        failed = status >= 500 or status == 0
        events = tuple(
            Event(name, extra, int(at * 1e9) + offset) for name, at, extra in trace.events
        )
        name = attrs["gen_ai.operation.name"]
        on_end(
            ReadableSpan(
                f"{name} {ctx.model}" if ctx.model else name,
                context=this,
                parent=parent,
                resource=self.resource,
                attributes=attrs,
                events=events,
                kind=SpanKind.SERVER,
                status=Status(StatusCode.ERROR, ctx.error_code or str(status))
                if failed
                else _UNSET,
                start_time=int(ctx.timings.start * 1e9) + offset,
                end_time=int(end * 1e9) + offset,
                instrumentation_scope=self.scope,
            )
        )

    def _host(self, url: str) -> str:
        end = url.find("/", 8)  # the end of scheme://host:port
        base = url if end < 0 else url[:end]
        host = self.hosts.get(base)
        if host is None:
            if len(self.hosts) > 1000:
                self.hosts.clear()
            host = self.hosts[base] = urlsplit(url).hostname or ""
        return host

    def _user_hash(self, user_id: str) -> str:
        """A SHA-256 prefix of the user id (a caller's requests come in runs: kept)."""
        digest = self.users.get(user_id)
        if digest is None:
            if len(self.users) > 10000:
                self.users.clear()
            digest = hashlib.sha256(user_id.encode()).hexdigest()[:16]
            self.users[user_id] = digest
        return digest

    def _call(
        self,
        ctx: RequestContext,
        trace: Trace,
        call: Call,
        parent: SpanContext,
        state: TraceState | None,
        offset: int,
        now: float,
    ) -> ReadableSpan:
        """A provider call's span; one still open never answered (cancelled, or failed)."""
        attrs = call.attrs or {}
        end = call.end or now
        status = call.status or ctx.status
        error = call.error
        if error is None:  # the call that answered (or the last one, failed)
            attrs["http.response.status_code"] = status
            if ctx.retries:
                attrs["tollway.retries"] = ctx.retries
            if ctx.upstream_request_id:
                attrs["tollway.upstream_request_id"] = ctx.upstream_request_id
            if status >= 400 or status == 0:
                error = ctx.error_code or str(status)
        if error is not None:
            attrs["error.type"] = error
        upstream = attrs.get("gen_ai.request.model", "")
        return ReadableSpan(
            f"{attrs.get('gen_ai.operation.name', '')} {upstream}",
            context=SpanContext(trace.trace_id, call.span_id, False, _SAMPLED, state),
            parent=parent,
            resource=self.resource,
            attributes=attrs,
            kind=SpanKind.CLIENT,
            status=Status(StatusCode.ERROR, error) if error is not None else _UNSET,
            start_time=int(call.start * 1e9) + offset,
            end_time=int(end * 1e9) + offset,
            instrumentation_scope=self.scope,
        )

    def _span(
        self,
        name: str,
        trace: Trace,
        parent: SpanContext,
        state: TraceState | None,
        start: float,
        end: float,
        offset: int,
        events: tuple[Event, ...] = (),
        attrs: dict[str, Any] | None = None,
    ) -> ReadableSpan:
        """An INTERNAL child of the request span (the stream, a recorded phase)."""
        error = attrs.get("error.type") if attrs else None
        return ReadableSpan(
            name,
            context=SpanContext(
                trace.trace_id, self.ids.generate_span_id(), False, _SAMPLED, state
            ),
            parent=parent,
            resource=self.resource,
            attributes=attrs or {},
            events=events,
            kind=SpanKind.INTERNAL,
            status=Status(StatusCode.ERROR, str(error)) if error is not None else _UNSET,
            start_time=int(start * 1e9) + offset,
            end_time=int(end * 1e9) + offset,
            instrumentation_scope=self.scope,
        )


def _clean(attrs: dict[str, Any] | None) -> dict[str, Any] | None:
    """A phase's attributes that OTLP can carry: any plugin records phases, and one value of
    another type would fail the whole batch in the exporter's thread."""
    if not attrs:
        return None
    return {
        k: v
        for k, v in attrs.items()
        if isinstance(v, _ATTR_TYPES)
        or (isinstance(v, list | tuple) and all(isinstance(x, _ATTR_TYPES) for x in v))
    }


def _finish_reasons(body: dict[str, Any]) -> list[str]:
    choices = body.get("choices")
    if isinstance(choices, list):
        return [
            c["finish_reason"]
            for c in choices
            if isinstance(c, dict) and isinstance(c.get("finish_reason"), str)
        ]
    reason = body.get("stop_reason")  # Anthropic messages
    if isinstance(reason, str):
        return [reason]
    status = body.get("status")  # Responses API
    return [status] if isinstance(status, str) and body.get("object") == "response" else []


def _content(body: dict[str, Any]) -> str:
    """What the client sent the model, as JSON (already redacted when privacy ran above)."""
    keep = {
        k: body[k]
        for k in ("system", "instructions", "messages", "input", "prompt", "suffix")
        if k in body
    }
    return orjson.dumps(keep, default=str).decode()


def _output(body: dict[str, Any]) -> str:
    """What the model answered, as JSON (choices' messages or text, or the content blocks)."""
    if "choices" in body:
        keep: Any = [
            c.get("message", c.get("text")) for c in body["choices"] if isinstance(c, dict)
        ]
    else:
        keep = body.get("content", body.get("output"))
    return orjson.dumps(keep, default=str).decode()
