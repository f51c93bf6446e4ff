"""The gateway's HTTP connections: a header deadline, and protocol errors in the API's shape.

aiohttp answers what never reaches an application handler itself: a header over its 8190-byte
limit or a malformed request line gets a plain-text 400 (with the offending bytes logged in a
traceback), and a connection that sends half a request line waits for the keep-alive timer
(an hour by default). A gateway's clients are SDKs that parse provider-shaped JSON errors, and
its listener faces the network, so ``tollway serve`` runs its app on this subclass of
aiohttp's connection handler:

* ``header_timeout``: a connection has that long to complete a request's headers, counted from
  its opening or from the first byte of each later request; then it is closed (slow-header
  clients cannot hold connections open). Idle keep-alive connections keep aiohttp's own
  ``keepalive_timeout``.
* ``handle_error``: protocol errors are JSON in the OpenAI shape (the path, hence the dialect,
  is unknown before the request line is parsed; Anthropic's for a failing /v1/messages route),
  with ``X-Request-Id``: 431 for a header or request line over the limit, 400 for other
  malformed requests, never a traceback in the reply, and no request bytes in the log.

It relies on three attributes of aiohttp's RequestHandler (``_waiter``, ``_messages``,
``_loop``) and on ``Server._kwargs``; tests/security/test_network.py fails if they change.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy.context import Dialect
from proxy.errors import error_body
from proxy.handler import new_request_id

log = logging.getLogger("tollway")


class GatewayProtocol(RequestHandler):
    """aiohttp's RequestHandler with a header deadline and provider-shaped protocol errors."""

    __slots__ = ("_header_timeout", "_header_timer")

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()  # the first request's headers are due within the deadline

    def data_received(self, data: bytes) -> None:
        # Checked after parsing: a request whose headers arrive in one read (nearly all of
        # them) never arms a timer, and the common case costs two attribute tests.
        super().data_received(data)
        if self._messages:  # headers complete: the request is aiohttp's now
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
        elif self._header_timer is None:
            waiter = self._waiter  # pending only while waiting for a request's headers
            if waiter is not None and not waiter.done():
                self._arm()  # a new request's first bytes, not its headers yet: now due

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_timer = self._loop.call_later(self._header_timeout, self._headers_late)

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self._messages:
            log.debug("closing a connection whose request headers did not arrive in time")
            self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A malformed request (or a failure outside the gateway's handlers) as JSON."""
        if request.writer.output_size > 0:  # a reply is half sent: only closing is left
            raise ConnectionError("response already started; cannot send an error reply")
        if isinstance(exc, LineTooLong) or (message or "").startswith("Too many headers"):
            status = 431
            text = (
                f"request headers too large: at most {self.max_field_size} bytes a line "
                f"and {self.max_headers} headers"
            )
            code = "request_headers_too_large"
        elif status >= 500:
            log.error("request %s %s failed", request.method, request.path, exc_info=exc)
            text, code = "internal gateway error", "internal_error"
        else:
            # a client's mistake: logged without the request's bytes (they may carry a key)
            log.debug("malformed request refused with %s: %s", status, type(exc).__name__)
            text, code = "malformed HTTP request", "invalid_request"
        dialect: Dialect = "anthropic" if request.path.startswith("/v1/messages") else "openai"
        resp = web.Response(
            status=status,
            body=orjson.dumps(error_body(dialect, status, text, code=code)),
            content_type="application/json",
            headers={"X-Request-Id": new_request_id()},
        )
        resp.force_close()
        return resp


class GatewayServer(web.Server):
    """aiohttp's Server, making GatewayProtocol connections."""

    def __init__(self, handler: Any, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout = header_timeout

    def __call__(self) -> RequestHandler:
        return GatewayProtocol(
            self, loop=self._loop, header_timeout=self.header_timeout, **self._kwargs
        )


class GatewayRunner(web.AppRunner):
    """AppRunner serving the app through GatewayServer."""

    def __init__(self, app: web.Application, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # starts the app; a plain aiohttp Server
        return GatewayServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=asyncio.get_running_loop(),
            header_timeout=self._header_timeout,
            **server._kwargs,
        )
