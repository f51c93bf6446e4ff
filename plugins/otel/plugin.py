"""otel: an OpenTelemetry trace of every request, exported over OTLP (off unless listed).

A span per request following the GenAI semantic conventions, with child spans for the provider
call (one per route tried: fallbacks), the stream (time to first byte) and each timed phase
the core and plugins recorded (``ctx.timings.phase``); see ``plugins.otel.spans``. OTLP/HTTP
by default, gRPC with ``protocol: grpc``. The client's W3C ``traceparent`` is followed and a new one, naming the
provider call's span, goes to the provider. The SDK is imported when a chain enables the
plugin, never otherwise (``pip install 'tollway[otel]'``).

Where it sits in ``chain:`` decides what its spans see. Its ``access`` hook opens the request
span: placed after ``privacy``, the request it records is the redacted one (what
``capture_content: true`` puts on spans); a request answered or refused above it (a cache hit,
a 429) still gets its span, dated from the request's start by the ``log`` hook. The hooks
only note times and values; the spans are built in ``log``, after the last byte.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from plugins.otel.config import OtelConfig
from proxy.context import RequestContext, UpstreamRequest
from proxy.hookspecs import hookimpl
from proxy.policy import Policy

if TYPE_CHECKING:
    from plugins.otel.spans import Traces


class OtelPlugin:
    """Traces requests; every hook only records, never changes the request or reply."""

    Config = OtelConfig

    def __init__(self, config: OtelConfig, policy: Policy) -> None:
        self.config = config
        try:
            from plugins.otel.spans import Traces

            self.traces: Traces = Traces(config)  # imports the gRPC exporter if asked for
        except ImportError as e:
            raise ValueError(
                f"the otel plugin needs OpenTelemetry: pip install 'tollway[otel]' ({e})"
            ) from None

    @hookimpl
    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        try:
            yield
        finally:  # the last batch is exported by the processor's thread, off the event loop
            await asyncio.to_thread(self.traces.shutdown)

    @hookimpl
    async def access(self, ctx: RequestContext) -> None:
        self.traces.begin(ctx)

    @hookimpl
    async def upstream_request(self, ctx: RequestContext, req: UpstreamRequest) -> None:
        self.traces.provider_call(ctx, req)

    @hookimpl
    async def response_body(self, ctx: RequestContext, body: dict[str, Any]) -> None:
        self.traces.body(ctx, body)

    @hookimpl
    async def response_headers(self, ctx: RequestContext, headers: dict[str, str]) -> None:
        self.traces.headers(ctx)

    @hookimpl
    async def log(self, ctx: RequestContext) -> None:
        self.traces.finish(ctx)
