"""The spans of one request, built with the OpenTelemetry SDK and exported over OTLP/HTTP.

Imported only when a chain enables the otel plugin (``OtelPlugin.__init__``), so a gateway
without it never loads the SDK. Spans follow the OpenTelemetry GenAI semantic conventions:

- the request: a SERVER span ``{operation} {requested model}`` (``chat gpt-5.4-mini``), a child
  of the client's W3C ``traceparent`` when it sends one;
- the provider call: a CLIENT span ``{operation} {upstream model}`` per route tried (a fallback
  gets its own span; the one it replaced ends in error), whose context is passed to the
  provider as ``traceparent``; the core's retries are counted on it (``tollway.retries``);
- a stream: a ``stream`` span from the provider's headers to the last byte, with a
  ``first_byte`` event (time to first byte).

Timestamps come from the core's ``ctx.timings`` (``perf_counter``), converted to wall-clock
nanoseconds with one offset taken per request. Spans are handed to a ``BatchSpanProcessor``,
whose own thread exports them: the event loop only queues finished spans.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any
from urllib.parse import urlsplit

import orjson
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from plugins.otel.config import OtelConfig
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

_PROPAGATOR = TraceContextTextMapPropagator()
_PARAMS = (
    ("max_tokens", "gen_ai.request.max_tokens"),
    ("max_completion_tokens", "gen_ai.request.max_tokens"),
    ("max_output_tokens", "gen_ai.request.max_tokens"),
    ("temperature", "gen_ai.request.temperature"),
    ("top_p", "gen_ai.request.top_p"),
)


class Trace:
    """One request's open spans and its clock offset (kept in ``ctx.stash``)."""

    __slots__ = ("model", "offset", "provider", "span", "stream")

    def __init__(self, span: Span, offset: int) -> None:
        self.span = span
        self.offset = offset  # wall-clock ns minus perf_counter ns
        self.provider: Span | None = None
        self.stream: Span | None = None
        self.model = False  # the reply named the model that served (gen_ai.response.model)

    def ns(self, perf: float) -> int:
        """A ``perf_counter`` reading as wall-clock nanoseconds."""
        return int(perf * 1e9) + self.offset


TRACE: StashKey[Trace] = StashKey()


class Traces:
    """Builds the spans of requests and owns the exporter."""

    def __init__(self, config: OtelConfig) -> None:
        self.config = config
        exporter = OTLPSpanExporter(
            endpoint=config.endpoint,
            headers={k: v.get_secret_value() for k, v in config.headers.items()},
            timeout=config.export_timeout,
        )
        self.processor = BatchSpanProcessor(
            exporter,
            max_queue_size=config.max_queue_size,
            schedule_delay_millis=config.schedule_delay * 1000,
            export_timeout_millis=config.export_timeout * 1000,
        )
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": config.service_name}),
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
            shutdown_on_exit=False,  # the lifespan shuts it down; atexit would pin each reload's
        )
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("tollway")

    def shutdown(self) -> None:
        """Export what is queued and stop the exporter's thread (blocking: run it off-loop)."""
        self.provider.shutdown()

    def begin(self, ctx: RequestContext) -> Trace:
        """Open the request's span (from the request's start), under the client's trace."""
        offset = time.time_ns() - time.perf_counter_ns()
        parent = _PROPAGATOR.extract(ctx.request.headers)
        op = OPERATIONS.get(ctx.endpoint, ctx.endpoint)
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": op,
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
        span = self.tracer.start_span(
            f"{op} {ctx.model}" if ctx.model else op,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attrs,
            start_time=int(ctx.timings.start * 1e9) + offset,
        )
        trace = ctx.stash[TRACE] = Trace(span, offset)
        return trace

    def provider_call(self, ctx: RequestContext, req: UpstreamRequest) -> None:
        """Open a provider call's span and pass its context to the provider."""
        trace = ctx.stash.get(TRACE) or self.begin(ctx)
        if trace.provider is not None:  # a fallback replaces the call that failed
            trace.provider.set_status(Status(StatusCode.ERROR, "fallback"))
            trace.provider.set_attribute("error.type", "fallback")
            trace.provider.end()
            trace.span.add_event("fallback", {"tollway.provider": req.provider})
        route = ctx.route
        upstream = route.upstream_model if route is not None else ""
        op = OPERATIONS.get(ctx.endpoint, ctx.endpoint)
        span = trace.provider = self.tracer.start_span(
            f"{op} {upstream}",
            context=set_span_in_context(trace.span),
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": op,
                "gen_ai.provider.name": req.kind,
                "gen_ai.system": req.kind,
                "gen_ai.request.model": upstream,
                "server.address": urlsplit(req.url).hostname or "",
                "tollway.provider": req.provider,
            },
        )
        _PROPAGATOR.inject(req.headers, context=set_span_in_context(span))

    def headers(self, ctx: RequestContext) -> None:
        """The provider answered (or failed): end its span; a stream's span starts here."""
        trace = ctx.stash.get(TRACE)
        if trace is None or trace.provider is None:
            return
        self._end_provider(ctx, trace)
        if ctx.stream and ctx.status < 300:
            trace.stream = self.tracer.start_span(
                "stream", context=set_span_in_context(trace.span), kind=SpanKind.INTERNAL
            )

    def body(self, ctx: RequestContext, body: dict[str, Any]) -> None:
        """A whole reply: the served model, finish reasons and (if asked) the completion."""
        trace = ctx.stash.get(TRACE)
        if trace is None:
            return
        span = trace.span
        model = body.get("model")
        if isinstance(model, str):
            span.set_attribute("gen_ai.response.model", model)
            trace.model = True
        reasons = _finish_reasons(body)
        if reasons:
            span.set_attribute("gen_ai.response.finish_reasons", reasons)
        rid = body.get("id")
        if isinstance(rid, str):
            span.set_attribute("gen_ai.response.id", rid)
        if self.config.capture_content:
            span.set_attribute("gen_ai.output.messages", _output(body))

    def finish(self, ctx: RequestContext) -> None:
        """After the last byte: the outcome on the request's span, and every span ended."""
        trace = ctx.stash.get(TRACE) or self.begin(ctx)
        end = trace.ns(ctx.timings.end or time.perf_counter())
        if trace.provider is not None:  # never answered: cancelled or failed before headers
            self._end_provider(ctx, trace)
        first = ctx.timings.first_byte
        if trace.stream is not None:
            if first:
                trace.stream.add_event("first_byte", timestamp=trace.ns(first))
            trace.stream.end(end)
        span = trace.span
        status = ctx.status
        attrs: dict[str, Any] = {"http.response.status_code": status}
        route = ctx.route
        if route is not None:
            attrs["tollway.model"] = route.model
            if not ctx.model:  # refused before the body was read: name the route at least
                attrs["gen_ai.request.model"] = route.model
            if not trace.model:
                attrs["gen_ai.response.model"] = route.upstream_model
            attrs["gen_ai.provider.name"] = route.kind
            attrs["gen_ai.system"] = route.kind
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
                digest = hashlib.sha256(principal.user_id.encode()).hexdigest()[:16]
                attrs["tollway.user"] = digest
            elif mode == "raw":
                attrs["tollway.user"] = principal.user_id
            if principal.tier is not None:
                attrs["tollway.tier"] = principal.tier
            if principal.key_id is not None:
                attrs["tollway.key_id"] = principal.key_id
        if ctx.error_code:
            attrs["error.type"] = ctx.error_code
        span.set_attributes(attrs)
        if status >= 500 or status == 0:
            span.set_status(Status(StatusCode.ERROR, ctx.error_code or str(status)))
        span.end(end)

    @staticmethod
    def _end_provider(ctx: RequestContext, trace: Trace) -> None:
        span = trace.provider
        assert span is not None
        trace.provider = None
        status = ctx.status
        attrs: dict[str, Any] = {"http.response.status_code": status}
        if ctx.retries:
            attrs["tollway.retries"] = ctx.retries
        if ctx.upstream_request_id:
            attrs["tollway.upstream_request_id"] = ctx.upstream_request_id
        if status >= 400 or status == 0:
            attrs["error.type"] = ctx.error_code or str(status)
            span.set_status(Status(StatusCode.ERROR, ctx.error_code or str(status)))
        span.set_attributes(attrs)
        span.end()


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
