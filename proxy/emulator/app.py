"""The emulator's aiohttp app: its routes, the wrapper around every ``/v1`` endpoint, ``serve``.

The wrapper does what every endpoint needs the same way: count the call, remember the request,
check the key, parse the body, then apply the injected faults (hang, latency, error status)
before the endpoint answers, and turn any failure into an error in the route's dialect.
``serve`` runs the app as its own process (``tollway emulator``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from proxy.emulator.chat import _ChatEndpoints
from proxy.emulator.controls import _Controls, _hang
from proxy.emulator.embeddings import _EmbeddingsEndpoint
from proxy.emulator.messages import _MessagesEndpoint
from proxy.emulator.models import _ModelsEndpoint
from proxy.emulator.responses import _ResponsesEndpoint
from proxy.emulator.wire import ID_HEADERS, REQUEST_ID, Dialect, Json, _BadRequest, _error

Impl = Callable[[web.Request, Json, _Controls], Awaitable[web.StreamResponse]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger(__name__)


class _Emulator(
    _ChatEndpoints, _MessagesEndpoint, _ResponsesEndpoint, _EmbeddingsEndpoint, _ModelsEndpoint
):
    """The emulator: its state (``_State``), every endpoint group, and the route wrapper."""

    def route(self, dialect: Dialect | None, impl: Impl, *, needs_body: bool = True) -> Handler:
        """Wrap an endpoint with accounting, auth, body parsing and the injected faults.

        ``dialect`` None means: Anthropic if the client sent ``anthropic-version``, else OpenAI.
        """

        async def handler(request: web.Request) -> web.StreamResponse:
            return await self._serve(request, dialect, impl, needs_body)

        return handler

    async def _serve(
        self, request: web.Request, dialect: Dialect | None, impl: Impl, needs_body: bool
    ) -> web.StreamResponse:
        """Answer, and give the reply the provider's request-id header (errors too), as the
        real APIs do: OpenAI's ``x-request-id``, Anthropic's ``request-id``, ``req_...``."""
        if dialect is None:
            dialect = "anthropic" if "anthropic-version" in request.headers else "openai"
        ids = request[REQUEST_ID] = {ID_HEADERS[dialect]: self.new_id("req_")}
        resp = await self._answer(request, dialect, impl, needs_body)
        if not resp.prepared:  # a stream set it itself before its headers went out
            resp.headers.update(ids)
        return resp

    async def _answer(
        self, request: web.Request, dialect: Dialect, impl: Impl, needs_body: bool
    ) -> web.StreamResponse:
        self.requests += 1
        self.by_path[request.path] += 1
        self.in_flight += 1
        try:
            body: Any = None
            if needs_body:
                try:
                    body = orjson.loads(await request.read())
                except orjson.JSONDecodeError:
                    body = None
            self.last = (request.path, request.headers, body)
            if self.api_key is not None and not self._authorised(request, dialect):
                return _error(dialect, 401, "Incorrect API key provided.")
            if needs_body and not isinstance(body, dict):
                return _error(dialect, 400, "We could not parse the JSON body of your request.")
            payload: Json = body if isinstance(body, dict) else {}
            ctl = _Controls.parse(request.headers, payload)
            if ctl.hang and not await _hang(request):
                return web.Response(status=499)  # nobody is listening any more
            if ctl.latency:
                await asyncio.sleep(ctl.latency)
            status = self._injected_status(ctl)
            if status is not None:
                headers = {"Retry-After": ctl.retry_after} if ctl.retry_after else None
                message = f"Emulated HTTP {status} error (x-emulator-status)"
                return _error(dialect, status, message, headers=headers)
            return await impl(request, payload, ctl)
        except _BadRequest as exc:
            return _error(dialect, exc.status, exc.message, param=exc.param)
        except web.HTTPException as exc:  # e.g. 413 from request.read(): keep the API's shape
            return _error(dialect, exc.status, exc.reason)
        except ConnectionError:  # the client left while we read its body
            return web.Response(status=499)
        except Exception:
            log.exception("emulator failed on %s", request.path)
            return _error(dialect, 500, "The emulator had an error processing your request.")
        finally:
            self.in_flight -= 1

    def _authorised(self, request: web.Request, dialect: Dialect) -> bool:
        """Bearer for OpenAI; Anthropic takes x-api-key or, as its newer SDKs send, Bearer."""
        headers = request.headers
        if dialect == "anthropic" and headers.get("x-api-key") == self.api_key:
            return True
        return headers.get("Authorization") == self.bearer

    async def not_found(self, request: web.Request, body: Json, ctl: _Controls) -> web.Response:
        dialect: Dialect = "anthropic" if "anthropic-version" in request.headers else "openai"
        return _error(dialect, 404, f"Unknown request URL: {request.method} {request.path}")


def create_emulator_app(*, api_key: str | None = None) -> web.Application:
    """Build the emulator; with ``api_key`` every /v1 request must present it."""
    emu = _Emulator(api_key)
    app = web.Application(client_max_size=64 * 1024 * 1024)  # benchmarks send big prompts
    app.router.add_post("/v1/chat/completions", emu.route("openai", emu.chat))
    app.router.add_post("/v1/completions", emu.route("openai", emu.completions))
    app.router.add_post("/v1/embeddings", emu.route("openai", emu.embeddings))
    app.router.add_post("/v1/messages", emu.route("anthropic", emu.messages))
    app.router.add_post("/v1/responses", emu.route("openai", emu.responses))
    app.router.add_post("/v1/responses/input_tokens", emu.route("openai", emu.input_tokens))
    responses = "/v1/responses/{id}"
    app.router.add_get(responses, emu.route("openai", emu.get_response, needs_body=False))
    app.router.add_delete(responses, emu.route("openai", emu.delete_response, needs_body=False))
    app.router.add_get(
        responses + "/input_items", emu.route("openai", emu.input_items, needs_body=False)
    )
    app.router.add_post("/v1/messages/count_tokens", emu.route("anthropic", emu.count_tokens))
    app.router.add_get("/v1/models", emu.route(None, emu.models, needs_body=False))
    app.router.add_get("/v1/models/{model_id}", emu.route(None, emu.model, needs_body=False))
    app.router.add_route("*", "/v1/{tail:.*}", emu.route(None, emu.not_found, needs_body=False))
    app.router.add_get("/_emulator/stats", emu.stats)
    app.router.add_post("/_emulator/reset", emu.reset)
    app.router.add_get("/_emulator/last", emu.last_request)
    return app


async def _run(host: str, port: int, api_key: str | None) -> None:
    runner = web.AppRunner(
        create_emulator_app(api_key=api_key),
        access_log=None,  # per-request logging would dominate benchmark profiles
        handler_cancellation=True,
        handle_signals=True,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound = runner.addresses[0][1] if runner.addresses else port
        print(f"emulator listening on http://{host}:{bound}", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def serve(host: str = "127.0.0.1", port: int = 9100, api_key: str | None = None) -> None:
    """Run the emulator until SIGINT/SIGTERM, on uvloop when it is installed."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_run(host, port, api_key))
    except (KeyboardInterrupt, web.GracefulExit):
        pass
