"""otel: a real OTLP/HTTP receiver (an aiohttp server in the test that decodes the protobuf
export requests with opentelemetry-proto) gets the spans of requests sent through a gateway."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from plugins.otel.plugin import OtelPlugin
from tests.conftest import Emulator, Gw, config_error, free_port, start_site
from tests.procs import fresh_interpreter, running, until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
SECRET_PROMPT = "the launch code is zebra-mango-42, write to ada@example.com"


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@dataclass
class Received:
    """Spans as the collector decoded them, and the raw bodies (to search for leaked text)."""

    spans: list[Span] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    service: set[str] = field(default_factory=set)

    async def handle(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        body = await request.read()
        self.raw.append(body)
        export = ExportTraceServiceRequest.FromString(body)
        for rs in export.resource_spans:
            for a in rs.resource.attributes:
                if a.key == "service.name":
                    self.service.add(value(a.value))
            for ss in rs.scope_spans:
                self.spans.extend(ss.spans)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def wait(self, n: int, within: float = 15.0) -> list[Span]:
        deadline = time.monotonic() + within
        while len(self.spans) < n:
            assert time.monotonic() < deadline, f"{len(self.spans)} spans of {n} arrived"
            await asyncio.sleep(0.05)
        return self.spans

    def named(self, name: str, kind: int = Span.SPAN_KIND_SERVER) -> Span:
        found = [s for s in self.spans if s.name == name and s.kind == kind]
        assert len(found) == 1, [s.name for s in self.spans]
        return found[0]


def attrs(span: Span) -> dict[str, Any]:
    return {a.key: value(a.value) for a in span.attributes}


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Received, str]]:
    got = Received()
    app = web.Application()
    app.router.add_post("/v1/traces", got.handle)
    runner, url = await start_site(app)
    yield got, f"{url}/v1/traces"
    await runner.cleanup()


def chain(endpoint: str, **config: Any) -> list[dict[str, Any]]:
    return [
        {"name": "auth"},
        {"name": "privacy"},
        {"name": "otel", "config": {"endpoint": endpoint, "schedule_delay": 0.1, **config}},
    ]


async def test_span_follows_the_client_trace_with_genai_attributes(
    make_gateway: Any, collector: tuple[Received, str], emulator: Emulator
) -> None:
    got, endpoint = collector
    gw: Gw = await make_gateway(chain(endpoint))
    client = gw.openai(await gw.create_key(user="alice"))
    reply = await client.chat.completions.create(
        model="gpt-5.4-mini",
        messages=[{"role": "user", "content": SECRET_PROMPT}],
        max_tokens=50,
        extra_headers={"traceparent": TRACEPARENT},
    )
    sent = await emulator.last()  # what the provider received
    await got.wait(2)
    server = got.named("chat gpt-5.4-mini")
    call = got.named("chat gpt-5.4-mini", Span.SPAN_KIND_CLIENT)
    assert got.service == {"tollway"}
    assert server.kind == Span.SPAN_KIND_SERVER
    assert server.trace_id.hex() == TRACE_ID and server.parent_span_id.hex() == PARENT_ID
    assert call.trace_id.hex() == TRACE_ID and call.parent_span_id == server.span_id
    a = attrs(server)
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-5.4-mini"
    assert a["gen_ai.response.model"] == reply.model
    assert a["gen_ai.request.max_tokens"] == 50
    assert reply.usage is not None
    assert a["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens
    assert a["gen_ai.response.finish_reasons"] == [reply.choices[0].finish_reason]
    assert a["http.response.status_code"] == 200
    assert a["tollway.user"] != "alice" and len(a["tollway.user"]) == 16  # a hash by default
    assert server.start_time_unix_nano <= call.start_time_unix_nano
    assert call.end_time_unix_nano <= server.end_time_unix_nano
    c = attrs(call)
    assert c["gen_ai.request.model"] == "gpt-5.4-mini" and c["tollway.provider"] == "openai"
    # the provider is told the trace, with the provider call's span as parent
    assert sent["headers"]["traceparent"] == f"00-{TRACE_ID}-{call.span_id.hex()}-01"
    # no prompt text (nor its redacted form) anywhere in what was exported
    exported = b"".join(got.raw)
    assert b"zebra-mango" not in exported and b"[EMAIL]" not in exported


async def test_stream_span_with_time_to_first_byte(
    make_gateway: Any, collector: tuple[Received, str]
) -> None:
    got, endpoint = collector
    gw: Gw = await make_gateway(chain(endpoint, user="none"))
    client = gw.anthropic(await gw.create_key())
    async with client.messages.stream(
        model="claude-sonnet", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        final = await stream.get_final_message()
    await got.wait(3)
    server = got.named("chat claude-sonnet")
    call = got.named("chat claude-sonnet-5", Span.SPAN_KIND_CLIENT)
    relay = got.named("stream", Span.SPAN_KIND_INTERNAL)
    assert relay.parent_span_id == server.span_id == call.parent_span_id
    assert call.end_time_unix_nano <= relay.start_time_unix_nano
    assert [e.name for e in relay.events] == ["first_byte"]
    assert relay.start_time_unix_nano <= relay.events[0].time_unix_nano
    a = attrs(server)
    assert a["gen_ai.provider.name"] == "anthropic" and a["tollway.stream"] is True
    assert a["gen_ai.usage.output_tokens"] == final.usage.output_tokens
    assert a["tollway.ttfb_ms"] > 0
    assert "tollway.user" not in a
    assert len({s.trace_id for s in got.spans}) == 1  # a new trace without a traceparent


async def test_content_is_captured_only_redacted_when_asked(
    make_gateway: Any, collector: tuple[Received, str]
) -> None:
    got, endpoint = collector
    gw: Gw = await make_gateway(chain(endpoint, capture_content=True))
    client = gw.openai(await gw.create_key())
    reply = await client.chat.completions.create(
        model="gpt-5.4-mini", messages=[{"role": "user", "content": SECRET_PROMPT}]
    )
    await got.wait(2)
    a = attrs(got.named("chat gpt-5.4-mini"))
    assert "zebra-mango-42" in a["gen_ai.input.messages"]
    assert "[EMAIL]" in a["gen_ai.input.messages"]
    assert "ada@example.com" not in a["gen_ai.input.messages"]
    assert reply.choices[0].message.content in a["gen_ai.output.messages"].replace("\\n", "\n")
    assert b"ada@example.com" not in b"".join(got.raw)


async def test_refused_request_has_its_span(
    make_gateway: Any, collector: tuple[Received, str]
) -> None:
    got, endpoint = collector
    gw: Gw = await make_gateway(chain(endpoint))
    client = gw.openai("tw_not-a-key")
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(
            model="gpt-5.4-mini",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"traceparent": TRACEPARENT},
        )
    (span,) = await got.wait(1)
    assert span.trace_id.hex() == TRACE_ID
    assert attrs(span)["http.response.status_code"] == 401
    assert attrs(span)["error.type"]


def test_endpoint_must_be_a_url() -> None:
    err = config_error("otel", "{endpoint: 'localhost:4318'}")
    assert "chain[0] (otel).config.endpoint" in err and "http://" in err


def test_sdk_not_imported_unless_enabled() -> None:
    """The command line imports every built-in plugin's module (for its commands) and a
    gateway builds its app: neither may load OpenTelemetry when no chain lists otel."""
    script = (
        "import sys\n"
        "from proxy.cli import build_parser\n"
        "build_parser()\n"
        "import plugins.otel.plugin\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    assert fresh_interpreter(script) == "[]"


@pytest.mark.parametrize("n", [1, 3], ids=["one-choice", "three-choices"])
@pytest.mark.parametrize("parsed", [False, True], ids=["relayed-raw", "events-parsed"])
async def test_openai_stream_has_finish_reasons_model_and_id(
    make_gateway: Any, collector: tuple[Received, str], parsed: bool, n: int
) -> None:
    """Read from the chunk ending each choice, whether the relay passes the stream on
    unparsed or parses every event (a cache recording a stream it may store). With several
    choices the first ones end long before the stream does."""
    got, endpoint = collector
    cache = [{"name": "cache", "config": {"key": "a" * 64, "default_ttl": "1h"}}]
    gw: Gw = await make_gateway(chain(endpoint) + (cache if parsed else []))
    client = gw.openai(await gw.create_key())
    stream = await client.chat.completions.create(
        model="gpt-5.4-mini",
        messages=[{"role": "user", "content": "hi " * 50}],
        max_tokens=300,
        n=n,
        stream=True,
        stream_options={"include_usage": True},  # the finish chunk is not the last one
        extra_headers={"x-emulator-chunk-delay-ms": "2"},  # each event a read of its own
    )
    chunks = [c async for c in stream]
    reasons = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert len(reasons) == n and len(chunks) > 20 * n
    await got.wait(3)
    a = attrs(got.named("chat gpt-5.4-mini"))
    assert a["gen_ai.response.finish_reasons"] == reasons
    assert a["gen_ai.response.id"] == chunks[-1].id
    assert a["gen_ai.response.model"] == chunks[-1].model


async def test_anthropic_stream_has_stop_reason_model_and_id(
    make_gateway: Any, collector: tuple[Received, str]
) -> None:
    got, endpoint = collector
    gw: Gw = await make_gateway(chain(endpoint))
    client = gw.anthropic(await gw.create_key())
    async with client.messages.stream(
        model="claude-sonnet", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        final = await stream.get_final_message()
    await got.wait(3)
    a = attrs(got.named("chat claude-sonnet"))
    assert final.stop_reason is not None
    assert a["gen_ai.response.finish_reasons"] == [final.stop_reason]
    assert a["gen_ai.response.id"] == final.id
    assert a["gen_ai.response.model"] == final.model


def children(got: Received, parent: Span, name: str) -> list[Span]:
    return [s for s in got.spans if s.name == name and s.parent_span_id == parent.span_id]


async def test_cache_lookup_and_retries_are_child_spans(
    make_gateway: Any, collector: tuple[Received, str]
) -> None:
    """Phases recorded by a plugin (the cache's lookup) and by the core (a provider try that
    was retried) become INTERNAL children of the request span, with their own times."""
    got, endpoint = collector
    cache = {"name": "cache", "config": {"key": "a" * 64, "default_ttl": "1h"}}
    gw: Gw = await make_gateway([*chain(endpoint), cache])
    client = gw.openai(await gw.create_key())
    ask: dict[str, Any] = {
        "model": "gpt-5.4-mini",
        "messages": [{"role": "user", "content": "cache me"}],
    }
    await client.chat.completions.create(
        **ask,
        extra_headers={
            "x-emulator-fail-times": "1",
            "x-emulator-key": f"otel-retry-{time.time()}",
            "x-emulator-status": "503",
        },
    )
    await client.chat.completions.create(**ask)
    await got.wait(6)  # 2 requests, 1 provider call, 2 lookups, 1 retried try
    first, second = sorted(
        (s for s in got.spans if s.kind == Span.SPAN_KIND_SERVER),
        key=lambda s: s.start_time_unix_nano,
    )
    assert attrs(first)["tollway.cache"] == "miss" and attrs(second)["tollway.cache"] == "hit"
    for span, outcome in ((first, "miss"), (second, "hit")):
        (lookup,) = children(got, span, "cache.lookup")
        assert lookup.kind == Span.SPAN_KIND_INTERNAL
        assert attrs(lookup) == {"tollway.cache": outcome}
        assert span.start_time_unix_nano <= lookup.start_time_unix_nano
        assert lookup.start_time_unix_nano <= lookup.end_time_unix_nano
        assert lookup.end_time_unix_nano <= span.end_time_unix_nano
    (tried,) = children(got, first, "upstream.try")
    t = attrs(tried)
    assert t["http.response.status_code"] == 503 and t["tollway.attempt"] == 1
    assert t["error.type"] == "503" and t["tollway.provider"] == "openai"
    assert tried.status.code == tried.status.STATUS_CODE_ERROR
    call = got.named("chat gpt-5.4-mini", Span.SPAN_KIND_CLIENT)
    assert attrs(call)["tollway.retries"] == 1
    assert tried.end_time_unix_nano <= call.end_time_unix_nano
    assert not children(got, second, "upstream.try")


async def test_limits_queue_wait_is_a_child_span(
    make_gateway: Any, collector: tuple[Received, str]
) -> None:
    """With one upstream slot, the second of two concurrent requests waits for it: that
    wait, and only it, is a ``limits.queue`` span as long as the first request's call."""
    got, endpoint = collector
    limits = {"name": "limits", "config": {"global": {"concurrent_requests": 1}}}
    gw: Gw = await make_gateway([chain(endpoint)[0], limits, *chain(endpoint)[1:]])
    client = gw.openai(await gw.create_key())
    slow = {"x-emulator-latency-ms": "300"}
    await asyncio.gather(
        *(
            client.chat.completions.create(
                model="gpt-5.4-mini",
                messages=[{"role": "user", "content": f"hi {i}"}],
                extra_headers=slow,
            )
            for i in range(2)
        )
    )
    await got.wait(5)
    (queued,) = [s for s in got.spans if s.name == "limits.queue"]
    assert attrs(queued) == {"tollway.admitted": True}
    waited_ms = (queued.end_time_unix_nano - queued.start_time_unix_nano) / 1e6
    assert waited_ms >= 250
    parent = next(s for s in got.spans if s.span_id == queued.parent_span_id)
    assert parent.kind == Span.SPAN_KIND_SERVER


async def test_unsampled_trace_is_propagated_not_exported(
    make_gateway: Any, collector: tuple[Received, str], emulator: Emulator
) -> None:
    """A client's unsampled traceparent is passed on (flag 00, a new parent id) and nothing
    is exported; with sample_ratio 0 a new trace is propagated unsampled too."""
    got, endpoint = collector
    gw: Gw = await make_gateway(chain(endpoint, sample_ratio=0.0))
    client = gw.openai(await gw.create_key())
    ask: dict[str, Any] = {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "hi"}]}
    await client.chat.completions.create(
        **ask,
        extra_headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"},
    )
    version, trace, parent, flags = (await emulator.last())["headers"]["traceparent"].split("-")
    assert (version, trace, flags) == ("00", TRACE_ID, "00") and parent != PARENT_ID
    await client.chat.completions.create(**ask)
    version, trace, parent, flags = (await emulator.last())["headers"]["traceparent"].split("-")
    assert trace != TRACE_ID and len(trace) == 32 and flags == "00"
    # a sampled client trace is still followed at ratio 0 (ParentBased)
    await client.chat.completions.create(
        **ask,
        extra_headers={"traceparent": TRACEPARENT},
    )
    spans = await got.wait(2)
    await asyncio.sleep(0.3)  # the unsampled requests' spans would have come by now
    assert len(spans) == 2 and {s.trace_id.hex() for s in spans} == {TRACE_ID}


async def test_translated_stream_has_the_providers_stop_reason(
    make_gateway: Any, collector: tuple[Received, str]
) -> None:
    """An OpenAI client streaming a Claude model: the reason is the provider's own."""
    got, endpoint = collector
    gw: Gw = await make_gateway(chain(endpoint))
    client = gw.openai(await gw.create_key())
    stream = await client.chat.completions.create(
        model="claude-sonnet", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    reasons = [ch.finish_reason async for c in stream for ch in c.choices if ch.finish_reason]
    assert reasons == ["stop"]
    await got.wait(3)
    a = attrs(got.named("chat claude-sonnet"))
    assert a["gen_ai.response.finish_reasons"] == ["end_turn"]
    assert a["gen_ai.response.model"] == "claude-sonnet-5"
    assert a["gen_ai.response.id"].startswith("msg_")


async def test_grpc_export_reaches_a_trace_service_with_its_metadata(
    make_gateway: Any, emulator: Emulator
) -> None:
    """``protocol: grpc``: a real OTLP/gRPC receiver process (grpcio serving the TraceService
    of opentelemetry-proto) decodes the spans; the configured headers arrive as metadata."""
    port = free_port()
    receiver = [sys.executable, "-m", "tests.plugins.otel.grpc_receiver", str(port)]
    with running(receiver, "listening on") as proc:
        headers = {"X-Collector-Key": "grpc-secret"}
        grpc = chain(f"http://127.0.0.1:{port}", protocol="grpc", headers=headers)
        gw: Gw = await make_gateway(grpc)
        client = gw.openai(await gw.create_key())
        reply = await client.chat.completions.create(
            model="gpt-5.4-mini",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=20,
            extra_headers={"traceparent": TRACEPARENT},
        )

        def spans() -> list[dict[str, Any]]:
            return [
                json.loads(line[5:]) for line in proc.text().splitlines() if line[:5] == "SPAN "
            ]

        await until(lambda: len(spans()) >= 2, what=lambda: proc.tail())
    server, call = sorted(spans(), key=lambda s: s["kind"])  # SERVER (2) before CLIENT (3)
    assert server["name"] == "chat gpt-5.4-mini" and server["kind"] == Span.SPAN_KIND_SERVER
    assert server["trace_id"] == call["trace_id"] == TRACE_ID
    assert server["parent_span_id"] == PARENT_ID and call["parent_span_id"] == server["span_id"]
    a = server["attributes"]
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-5.4-mini" and a["gen_ai.request.max_tokens"] == 20
    assert a["gen_ai.response.model"] == reply.model
    assert reply.usage is not None
    assert a["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens
    assert server["service"] == "tollway"
    assert server["metadata"]["x-collector-key"] == "grpc-secret"


def test_protocol_is_checked() -> None:
    err = config_error("otel", "{protocol: thrift}")
    assert "chain[0] (otel).config.protocol" in err and "grpc" in err


def test_encoder_writes_what_the_sdk_encoder_writes() -> None:
    """The direct protobuf encoder against the SDK's own, decoded and compared field by
    field: every attribute type, events, a remote parent with tracestate, error statuses."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import (
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
        TraceState,
    )

    from plugins.otel.export import Encoder

    resource = Resource.create({"service.name": "tollway"})
    scope = InstrumentationScope("tollway")
    sampled = TraceFlags(TraceFlags.SAMPLED)
    state = TraceState([("vendor", "opaque-1")])
    remote = SpanContext(2**127 + 5, 2**63 + 7, True, sampled, state)
    spans = []
    for i, kind in enumerate([SpanKind.SERVER, SpanKind.CLIENT, SpanKind.INTERNAL] * 2):
        attrs: dict[str, Any] = {
            "s": "naïve ✓ text",
            "empty": "",
            "yes": True,
            "no": False,
            "one": 1,  # equal to True as a dict key: must stay an int
            "big": 2**62,
            "negative": -42,
            "f": 0.125 * i,
            "reasons": ["stop", "length"],
            "ints": [1, -2],
            "i": i,
        }
        spans.append(
            ReadableSpan(
                f"span {i} ✓",
                context=SpanContext(remote.trace_id, 1000 + i, False, sampled, state),
                parent=remote if i % 3 == 0 else SpanContext(remote.trace_id, 999, False),
                resource=resource,
                attributes=attrs,
                events=(Event("first_byte", None, 1_700_000_000_000_000_001 + i),)
                + ((Event("fallback", {"tollway.provider": "b"}, 5),) if i == 1 else ()),
                kind=kind,
                status=(
                    Status(StatusCode.ERROR, "upstream_503")
                    if i == 1
                    else Status(StatusCode.ERROR)
                    if i == 2
                    else Status(StatusCode.UNSET)
                ),
                start_time=1_700_000_000_000_000_000 + i,
                end_time=1_700_000_000_500_000_000 + i,
                instrumentation_scope=scope,
            )
        )
    ours = ExportTraceServiceRequest.FromString(Encoder(resource, "tollway").encode(spans))
    theirs = ExportTraceServiceRequest.FromString(encode_spans(spans).SerializeToString())
    assert ours == theirs
    assert len(ours.resource_spans[0].scope_spans[0].spans) == 6


async def test_export_is_retried_when_the_collector_is_unavailable(
    make_gateway: Any,
) -> None:
    """A 503 from the collector is retried (in the exporter's thread): the spans arrive."""
    got = Received()
    answers = [503]

    async def handle(request: web.Request) -> web.Response:
        if answers:
            await request.read()
            return web.Response(status=answers.pop())
        return await got.handle(request)

    app = web.Application()
    app.router.add_post("/v1/traces", handle)
    runner, url = await start_site(app)
    try:
        gw: Gw = await make_gateway(chain(f"{url}/v1/traces"))
        client = gw.openai(await gw.create_key())
        await client.chat.completions.create(
            model="gpt-5.4-mini", messages=[{"role": "user", "content": "hi"}]
        )
        await got.wait(2)
        assert not answers
    finally:
        await runner.cleanup()


async def test_a_hung_collector_costs_no_requests_logs_or_a_long_stop(
    make_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A collector that accepts connections and never answers: requests are served at their
    usual pace, the full queue (smaller than the SDK's default batch of 512, which is allowed)
    drops spans with a log line or two, not one per request, and stopping the plugin waits at
    most ``export_timeout`` (the SDK's own shutdown waits one per queued batch after the export
    under way, up to 30 s)."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)  # never accepted: the exporter's POST waits for its timeout
    try:
        endpoint = f"http://127.0.0.1:{hung.getsockname()[1]}/v1/traces"
        gw: Gw = await make_gateway(chain(endpoint, max_queue_size=8, export_timeout=1.0))
        client = gw.openai(await gw.create_key())
        caplog.set_level(logging.INFO)
        started = time.monotonic()
        for _ in range(40):
            await client.chat.completions.create(
                model="gpt-5.4-mini", messages=[{"role": "user", "content": "hi"}]
            )
        assert time.monotonic() - started < 5.0
        lines = [r.getMessage() for r in caplog.records if not r.name.startswith("httpx")]
        assert sum("dropping" in m for m in lines) <= 2, lines
        (otel,) = [p for p in gw.gateway.runtime.chain.plugins if isinstance(p, OtelPlugin)]
        started = time.monotonic()
        await asyncio.to_thread(otel.traces.shutdown)  # as its lifespan ends
        assert time.monotonic() - started < 1.5
    finally:
        hung.close()
