"""The ``x-emulator-*`` controls of one request, and the faults that act while it is answered.

Behaviour is steered per request by ``x-emulator-*`` headers (see ``_Controls``), which the
gateway forwards untouched, or by a model named ``emu-slow-<ms>`` (latency) or
``emu-status-<code>`` (an error status) where headers can't be set. The route wrapper
(``app``) applies latency and injected error statuses before an endpoint runs; this module holds a request that should hang, and paces or aborts a stream. A stream
with no pacing controls goes out in a single write, the fast path for benchmarks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from proxy.emulator.wire import REQUEST_ID, Json

_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_MAX_WORDS = 1_000_000  # cap on x-emulator-words so a typo can't exhaust memory
_HANG_SECONDS = 3600.0
_HANG_POLL = 0.05  # how often a hung request checks whether its client went away


@dataclass(slots=True)
class _Controls:
    """Per-request behaviour asked for by ``x-emulator-*`` headers or an ``emu-*`` model name.

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
    stop_after: int | None = None  # x-emulator-stream-stop-after: end it cleanly after N

    @classmethod
    def parse(cls, headers: Mapping[str, str], body: Json) -> _Controls:
        ctl = cls()
        model = body.get("model")
        if isinstance(model, str) and model.startswith("emu-"):
            if model.startswith("emu-slow-"):
                ctl.latency = _seconds(model[9:])
            elif model.startswith("emu-status-") and (n := _int(model[11:])) is not None:
                ctl.status = n if 400 <= n <= 599 else None
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
        ctl.stop_after = _int(get("x-emulator-stream-stop-after"))
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


async def _stream(request: web.Request, events: list[bytes], ctl: _Controls) -> web.StreamResponse:
    """Send SSE events, honouring chunk delay and abort; a vanished client ends it quietly.

    An abort drops the connection mid-body (a provider dying); a stop ends the body properly
    but before the terminal event (an intermediary cutting the stream short).
    """
    if ctl.stop_after is not None:
        events = events[: ctl.stop_after]
    resp = web.StreamResponse(headers={**_SSE_HEADERS, **request.get(REQUEST_ID, {})})
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
