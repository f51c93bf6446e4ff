"""accesslog: one JSON line per request, for a log store (Loki, Elasticsearch, CloudWatch ...).

Add it to ``chain:`` (it is not in the shipped chain); each request's line is written once the
last byte went out, from the ``log`` hook, with the fields of ``fields`` in that order: who
asked (``user``, ``key_id``, ``feature``, ``client_ip`` per the trusted-proxy rules), what
(``model`` asked, ``served_model``, ``route``: the HTTP path), how it went (``cache``,
``status``, ``error_code``, tokens, ``price``, ``latency_ms``, ``ttfb_ms``). Every field is a
fact of the request context, never a header or a body: no gateway or provider key, no prompt
and no completion can reach the file.

Disk never blocks the event loop: the hook only serialises the line (orjson) and appends it
to a queue; a writer thread writes whatever has accumulated in one ``write`` and flushes. If
the disk falls so far behind that ``max_pending`` lines wait, further lines are dropped and
counted, and the writer then logs how many were lost rather than letting memory grow.

No rotation: write to stdout (the container runtime collects it), or rotate the file with
logrotate's ``copytruncate`` (the file is opened in append mode, so writes continue at the
truncated end).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import IO, Any, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from proxy.context import RequestContext
from proxy.hookspecs import hookimpl
from proxy.policy import Policy
from proxy.pricing import billed_tokens, request_price

log = logging.getLogger(__name__)

FieldName = Literal[
    "ts",
    "request_id",
    "user",
    "key_id",
    "tier",
    "feature",
    "model",
    "served_model",
    "upstream_model",
    "provider",
    "route",
    "method",
    "endpoint",
    "stream",
    "cache",
    "shared",
    "status",
    "error_code",
    "input_tokens",
    "output_tokens",
    "price",
    "retries",
    "latency_ms",
    "ttfb_ms",
    "client_ip",
    "upstream_request_id",
]

DEFAULT_FIELDS: list[FieldName] = [
    "ts",
    "request_id",
    "user",
    "key_id",
    "feature",
    "model",
    "served_model",
    "route",
    "cache",
    "status",
    "error_code",
    "input_tokens",
    "output_tokens",
    "price",
    "latency_ms",
    "ttfb_ms",
    "client_ip",
]


class AccessLogConfig(BaseModel):
    """Where the lines go and which fields they hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    to: str = Field(
        "stdout",
        description="stdout, or the path of a file the lines are appended to (relative to the "
        "working directory; rotate it with logrotate's copytruncate).",
    )
    fields: list[FieldName] = Field(
        default_factory=lambda: list(DEFAULT_FIELDS),
        description="The fields of each line, in this order; model is the name asked for, "
        "served_model the policy model that answered, route the HTTP path, price in USD.",
    )
    max_pending: int = Field(
        100_000,
        ge=100,
        description="Lines waiting for the disk beyond which new lines are dropped (counted "
        "and reported in the gateway's log).",
    )

    @field_validator("to")
    @classmethod
    def _to_set(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("to must be stdout or a file path")
        return v

    @field_validator("fields")
    @classmethod
    def _fields_once(cls, v: list[FieldName]) -> list[FieldName]:
        if not v:
            raise ValueError("fields must name at least one field")
        dup = sorted({f for f in v if v.count(f) > 1})
        if dup:
            raise ValueError(f"fields listed twice: {', '.join(dup)}")
        return v


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


Getter = Callable[[RequestContext], Any]


def _getters(
    prices: dict[str, float], tier_prices: dict[str, dict[str, float]]
) -> dict[str, Getter]:
    """Each field's value from the context: facts only (ids, names, numbers), never a body."""
    return {
        "ts": lambda ctx: round(time.time(), 3),
        "request_id": lambda ctx: ctx.request_id,
        "user": lambda ctx: ctx.principal.user_id if ctx.principal else None,
        "key_id": lambda ctx: ctx.principal.key_id if ctx.principal else None,
        "tier": lambda ctx: ctx.principal.tier if ctx.principal else None,
        "feature": lambda ctx: ctx.feature,
        "model": lambda ctx: ctx.model or None,
        "served_model": lambda ctx: ctx.route.model if ctx.route else None,
        "upstream_model": lambda ctx: ctx.route.upstream_model if ctx.route else None,
        "provider": lambda ctx: ctx.route.provider if ctx.route else None,
        "route": lambda ctx: ctx.request.path,
        "method": lambda ctx: ctx.request.method,
        "endpoint": lambda ctx: ctx.endpoint,
        "stream": lambda ctx: ctx.stream,
        "cache": lambda ctx: ctx.cache,
        "shared": lambda ctx: ctx.shared,
        "status": lambda ctx: ctx.status,
        "error_code": lambda ctx: ctx.error_code,
        "input_tokens": lambda ctx: billed_tokens(ctx)[0],
        "output_tokens": lambda ctx: billed_tokens(ctx)[1],
        "price": lambda ctx: request_price(ctx, prices, tier_prices),
        "retries": lambda ctx: ctx.retries,
        "latency_ms": lambda ctx: _ms(ctx.timings.latency_ms()),
        "ttfb_ms": lambda ctx: _ms(ctx.timings.ttfb_ms()),
        "client_ip": lambda ctx: ctx.client_ip,
        "upstream_request_id": lambda ctx: ctx.upstream_request_id,
    }


class LineWriter:
    """Appends lines to a stream from a thread of its own; ``put`` never touches the disk."""

    def __init__(self, to: str, max_pending: int) -> None:
        self.to = to
        self.max_pending = max_pending
        self.pending: deque[bytes] = deque()
        self.dropped = 0
        self.written = 0
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._out: IO[bytes] | None = None

    def open(self) -> None:
        """Open the file (or take stdout) and start the thread; raise if the file cannot open."""
        if self.to == "stdout":
            self._out = sys.stdout.buffer
        else:
            try:
                self._out = open(self.to, "ab")  # closed in close()
            except OSError as e:
                raise RuntimeError(f"cannot open {self.to}: {e.strerror}") from None
        self._thread = threading.Thread(target=self._run, name="accesslog", daemon=True)
        self._thread.start()

    def put(self, line: bytes) -> None:
        if len(self.pending) >= self.max_pending:
            self.dropped += 1
            return
        self.pending.append(line)
        if not self._wake.is_set():
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()  # before draining: a line put after this wakes the next round
            self._drain()
            if self._stop:
                self._drain()
                return

    def _drain(self) -> None:
        pending = self.pending
        if not pending:
            return
        batch: list[bytes] = []
        try:
            while True:
                batch.append(pending.popleft())
        except IndexError:
            pass
        out = self._out
        assert out is not None
        try:
            out.write(b"".join(batch))
            out.flush()
            self.written += len(batch)
        except (OSError, ValueError) as e:  # a full disk, a closed stdout: say so, keep serving
            self.dropped += len(batch)
            log.warning("accesslog: writing to %s failed: %s", self.to, type(e).__name__)
        if self.dropped:
            n, self.dropped = self.dropped, 0
            log.warning("accesslog: %d lines dropped (the disk fell behind)", n)

    def close(self) -> None:
        """Write what is pending, stop the thread, close the file (blocking: run off the loop)."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        if self._out is not None and self._out is not sys.stdout.buffer:
            self._out.close()


class AccessLogPlugin:
    """Writes one JSON line per request; see the module docstring."""

    Config = AccessLogConfig

    def __init__(self, config: AccessLogConfig, policy: Policy) -> None:
        self.config = config
        prices = {name: f.price_per_request for name, f in policy.features.items()}
        tier_prices = {name: dict(t.prices) for name, t in policy.tiers.items() if t.prices}
        getters = _getters(prices, tier_prices)
        self.fields: tuple[tuple[str, Getter], ...] = tuple(
            (name, getters[name]) for name in config.fields
        )
        self.writer: LineWriter | None = None

    @hookimpl
    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        writer = LineWriter(self.config.to, self.config.max_pending)
        await asyncio.to_thread(writer.open)
        self.writer = writer
        try:
            yield
        finally:
            self.writer = None
            await asyncio.to_thread(writer.close)

    @hookimpl
    async def log(self, ctx: RequestContext) -> None:
        writer = self.writer
        if writer is None:
            return
        line = {name: get(ctx) for name, get in self.fields}
        writer.put(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
