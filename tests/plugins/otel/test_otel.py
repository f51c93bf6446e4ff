"""otel: a real OTLP/HTTP receiver (an aiohttp server in the test that decodes the protobuf
export requests with opentelemetry-proto) gets the spans of requests sent through a gateway."""

from __future__ import annotations

import asyncio
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

from tests.conftest import Emulator, Gw, config_error, start_site
from tests.procs import fresh_interpreter

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
