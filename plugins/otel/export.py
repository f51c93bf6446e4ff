"""Sending finished spans to a collector: a direct OTLP protobuf encoder and the transports.

Runs in the ``BatchSpanProcessor``'s thread, off the event loop, but in the gateway's process:
its CPU is the gateway's, and while it holds the GIL the event loop waits. The SDK's encoder
builds a protobuf object per attribute (about 40 µs per span of ours); the spans here have a
known shape (built by ``plugins.otel.spans``: plain attribute dicts of str, bool, int, float
or lists of them, one resource, one scope), so ``Encoder`` writes the protobuf wire format
of ``ExportTraceServiceRequest`` directly, reusing the bytes of attributes that repeat (the
model, the provider, a 200), at a sixth of the cost. The format is
``opentelemetry/proto/trace/v1/trace.proto``; the tests decode it with opentelemetry-proto.

Transports: ``http/protobuf`` POSTs the bytes with ``requests`` (what the SDK's HTTP exporter
uses); ``grpc`` hands them to the SDK's gRPC exporter (TLS, metadata, retries are its own).
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanContext

from plugins.otel.config import OtelConfig

log = logging.getLogger("tollway")

_RETRY_STATUSES = frozenset({429, 502, 503, 504})
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200  # Span.flags (SpanFlags)
_DOUBLE = struct.Struct("<d").pack
_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, data: bytes) -> bytes:
    """A length-delimited field (``tag`` already encoded)."""
    return tag + _varint(len(data)) + data


def _text(s: str) -> bytes:
    return s.encode("utf-8", "replace")


def _value(v: Any) -> bytes:
    """An ``AnyValue`` message's body."""
    if isinstance(v, str):
        return _field(b"\x0a", _text(v))
    if isinstance(v, bool):
        return b"\x10\x01" if v else b"\x10\x00"
    if isinstance(v, int):
        return b"\x18" + _varint(v & 0xFFFFFFFFFFFFFFFF)  # int64: two's complement
    if isinstance(v, float):
        return b"\x21" + _DOUBLE(v)
    if isinstance(v, list | tuple):  # ArrayValue
        return _field(b"\x2a", b"".join(_field(b"\x0a", _value(x)) for x in v))
    return _field(b"\x0a", _text(str(v)))


class Encoder:
    """``ExportTraceServiceRequest`` bytes of a batch of spans, written field by field."""

    def __init__(self, resource: Resource, scope: str) -> None:
        attrs = b"".join(self._pair(b"\x0a", k, v) for k, v in resource.attributes.items())
        self.resource = _field(b"\x0a", attrs)  # ResourceSpans.resource
        self.scope = _field(b"\x0a", _field(b"\x0a", _text(scope)))  # ScopeSpans.scope
        self.pairs: dict[tuple[bytes, str, type, Any], bytes] = {}

    @staticmethod
    def _pair(tag: bytes, key: str, value: Any) -> bytes:
        return _field(tag, _field(b"\x0a", _text(key)) + _field(b"\x12", _value(value)))

    def attributes(self, tag: bytes, attrs: Any) -> bytes:
        """Repeated ``KeyValue`` fields; a (key, value) pair seen before is not re-encoded."""
        if not attrs:
            return b""
        pairs = self.pairs
        out = []
        for k, v in attrs.items():
            if isinstance(v, list | tuple):
                out.append(self._pair(tag, k, v))
                continue
            key = (tag, k, v.__class__, v)  # 1 and True are equal: the type tells them apart
            b = pairs.get(key)
            if b is None:
                if len(pairs) >= 4096:  # request ids never repeat: start over now and then
                    pairs.clear()
                b = pairs[key] = self._pair(tag, k, v)
            out.append(b)
        return b"".join(out)

    def span(self, span: ReadableSpan) -> bytes:
        ctx = span.context
        assert ctx is not None
        parent: SpanContext | None = span.parent
        out = [
            b"\x0a\x10" + ctx.trace_id.to_bytes(16, "big"),
            b"\x12\x08" + ctx.span_id.to_bytes(8, "big"),
        ]
        state = ctx.trace_state
        if state:
            out.append(_field(b"\x1a", _text(state.to_header())))
        flags = _HAS_IS_REMOTE
        if parent is not None:
            out.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
            if parent.is_remote:
                flags |= _IS_REMOTE
        out.append(_field(b"\x2a", _text(span.name)))
        out.append(b"\x30" + _varint(span.kind.value + 1))  # the SDK's kinds start at 0
        out.append(b"\x39" + _FIXED64(span.start_time or 0))
        out.append(b"\x41" + _FIXED64(span.end_time or 0))
        out.append(self.attributes(b"\x4a", span.attributes))
        for event in span.events:
            body = b"\x09" + _FIXED64(event.timestamp) + _field(b"\x12", _text(event.name))
            out.append(_field(b"\x5a", body + self.attributes(b"\x1a", event.attributes)))
        status = span.status
        code = status.status_code.value
        if code:
            message = _field(b"\x12", _text(status.description)) if status.description else b""
            out.append(_field(b"\x7a", message + b"\x18" + _varint(code)))
        else:
            out.append(b"\x7a\x00")  # UNSET: an empty status, as the SDK writes it
        out.append(b"\x85\x01" + _FIXED32(flags))
        return b"".join(out)

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        body = b"".join([_field(b"\x12", self.span(s)) for s in spans])
        scope_spans = _field(b"\x12", self.scope + body)
        return _field(b"\x0a", self.resource + scope_spans)


class HttpExporter(SpanExporter):
    """OTLP/HTTP: the encoded batch POSTed as ``application/x-protobuf``; a 429, 502, 503, 504
    or an unreachable collector is retried with backoff until ``timeout``, then dropped."""

    def __init__(self, encoder: Encoder, url: str, headers: dict[str, str], timeout: float):
        import requests

        self.requests = requests
        self.encoder = encoder
        self.url = url
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers.update({"Content-Type": "application/x-protobuf", **headers})

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        body = self.encoder.encode(spans)
        deadline = time.monotonic() + self.timeout
        delay = 0.5
        while True:
            left = deadline - time.monotonic()
            try:
                resp = self.session.post(self.url, data=body, timeout=max(left, 0.1))
                if resp.ok:
                    return SpanExportResult.SUCCESS
                retry, why = resp.status_code in _RETRY_STATUSES, f"HTTP {resp.status_code}"
            except self.requests.RequestException as e:
                retry, why = True, type(e).__name__
            if not retry or time.monotonic() + delay >= deadline:
                log.warning("otel: %d spans not exported to %s (%s)", len(spans), self.url, why)
                return SpanExportResult.FAILURE
            time.sleep(delay)
            delay *= 2

    def shutdown(self) -> None:
        self.session.close()


def exporter(config: OtelConfig, resource: Resource, scope: str) -> SpanExporter:
    """The span exporter of ``config.protocol`` (the gRPC one imported only when chosen)."""
    encoder = Encoder(resource, scope)
    headers = {k.lower(): v.get_secret_value() for k, v in config.headers.items()}
    if config.protocol == "http/protobuf":
        return HttpExporter(encoder, config.url, headers, config.export_timeout)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    class GrpcExporter(OTLPSpanExporter):
        """The SDK's gRPC exporter, given the batch encoded here (read back into its message
        type in C, far cheaper than building it attribute by attribute)."""

        def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
            return ExportTraceServiceRequest.FromString(encoder.encode(data))

    return GrpcExporter(
        endpoint=config.url,
        insecure=urlsplit(config.url).scheme == "http",
        headers=headers,  # gRPC metadata (lower-case keys)
        timeout=config.export_timeout,
    )
