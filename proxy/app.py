"""create_app(policy) -> web.Application: routes, shared resources, lifecycle.

Resources are opened with aiohttp's ``cleanup_ctx`` (open, yield, close): the pooled upstream
session first, then the chain's plugin lifespans, closed in reverse on shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from proxy import admin
from proxy.appkeys import GATEWAY, KEYSTORE, METRICS, SHARED
from proxy.chain import compile_chain
from proxy.context import RequestContext
from proxy.errors import Reject, reject_body
from proxy.gateway import Gateway
from proxy.handler import authenticate, make_handler, new_request_id
from proxy.keystore import KeyStore
from proxy.keysync import KeySync
from proxy.policy import LoadedPolicy
from proxy.runtime import Runtime
from proxy.shared import Shared
from proxy.statewatch import STATE_WATCH, StateWatch

CLIENT_ENDPOINTS = {
    "/v1/chat/completions": ("chat", "openai"),
    "/v1/completions": ("completions", "openai"),
    "/v1/embeddings": ("embeddings", "openai"),
    "/v1/messages": ("messages", "anthropic"),
}


def create_app(
    loaded: LoadedPolicy,
    *,
    extra_plugins: dict[str, Callable[..., Any]] | None = None,
    keystore: KeyStore | None = None,
) -> web.Application:
    """Build the gateway application; raises PolicyError if the chain does not compile."""
    chain = compile_chain(loaded, extra_plugins=extra_plugins)
    if keystore is None:
        state_dir = loaded.policy.state.dir
        keystore = KeyStore(Path(state_dir) / "keys.json" if state_dir else None)
    gw = Gateway(Runtime.build(loaded, chain), keystore, extra_plugins)
    listen = loaded.policy.listen
    app = web.Application(
        # bodies aiohttp reads itself (the admin API's) get the client endpoints' bound
        client_max_size=listen.max_body_bytes,
        handler_args={
            # request bodies are inflated by proxy/body.py with a bound on the inflated size;
            # aiohttp's own inflating checks only the compressed size (a decompression bomb)
            "auto_decompress": False,
            "keepalive_timeout": listen.keepalive_timeout,
        },
    )
    app.on_response_prepare.append(_request_id)
    app[GATEWAY] = gw
    app[KEYSTORE] = keystore
    app[SHARED] = Shared()
    app[METRICS] = gw.metrics
    gw.app = app
    app.cleanup_ctx.append(_upstream_session)
    state = loaded.policy.state
    if state.shared:
        watch = StateWatch(state.url, state.on_unavailable, state.check_interval)
        app[SHARED].put(STATE_WATCH, watch)  # limits and quotas fall back on what it reports
        gw.keysync = KeySync(keystore, state.url, watch)
        app.cleanup_ctx.append(_key_sync)
    app.cleanup_ctx.append(_chain_lifespan)
    app.on_shutdown.append(_shutdown_begins)
    for path, (endpoint, dialect) in CLIENT_ENDPOINTS.items():
        app.router.add_post(path, make_handler(endpoint, dialect))  # type: ignore[arg-type]
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    admin.add_routes(app)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    # No connection cap here: admission control is the limits plugin's job, not the pool's.
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
    gw.session = aiohttp.ClientSession(connector=connector)
    yield
    await gw.session.close()


async def _key_sync(app: web.Application) -> AsyncIterator[None]:
    sync = app[GATEWAY].keysync
    watch = app[SHARED].find(STATE_WATCH)
    assert sync is not None and watch is not None
    await watch.start()
    await sync.start()  # every issued key is known before the gateway serves
    yield
    await sync.stop()
    await watch.stop()


async def _chain_lifespan(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    await gw.runtime.chain.start(app)
    gw.ready = True
    yield
    gw.ready = False
    await gw.close()
    await app[SHARED].close()


async def _shutdown_begins(app: web.Application) -> None:
    """The listener is closed; in-flight requests get ``listen.shutdown_timeout`` from now.

    Readiness goes off, and what plugins registered with ``Shared.on_shutdown`` runs now (an
    admin query is stopped and answered at once rather than holding the shutdown open until
    its handler is cancelled)."""
    app[GATEWAY].ready = False
    await app[SHARED].shutdown()


def _dialect_of(request: web.Request) -> str:
    if request.path.startswith("/v1/messages") or "anthropic-version" in request.headers:
        return "anthropic"
    return "openai"


async def list_models(request: web.Request) -> web.Response:
    """The policy's models, in the OpenAI list shape or, for Anthropic clients, theirs."""
    gw = request.app[GATEWAY]
    rt = gw.runtime
    dialect = _dialect_of(request)
    if rt.chain.authenticate:
        ctx = RequestContext(
            request_id=new_request_id(),
            endpoint="chat",
            dialect=dialect,  # type: ignore[arg-type]
            request=request,
            client_ip=request.remote or "",
        )
        try:
            await authenticate(rt, ctx)
        except Reject as e:
            return web.Response(
                status=e.status, body=reject_body(e, ctx.dialect), content_type="application/json"
            )
    names = list(rt.routes)
    owners = {n: r.provider for n, r in rt.routes.items()}
    for plugin in rt.chain.plugins:  # names a plugin answers for itself (routing's "auto")
        for extra in getattr(plugin, "extra_models", ()):
            if extra not in owners:
                names.append(extra)
                owners[extra] = "tollway"
    if dialect == "anthropic":
        data: dict[str, Any] = {
            "data": [
                {"type": "model", "id": n, "display_name": n, "created_at": "2025-01-01T00:00:00Z"}
                for n in names
            ],
            "has_more": False,
            "first_id": names[0] if names else None,
            "last_id": names[-1] if names else None,
        }
    else:
        data = {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": owners[n]} for n in names
            ],
        }
    return web.Response(body=orjson.dumps(data), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: plugins started and not shutting down (a load balancer may route here)."""
    gw = request.app[GATEWAY]
    if not gw.ready:
        return web.json_response({"status": "starting"}, status=503)
    return web.json_response({"status": "ready", "reloads": gw.reloads})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition of the core counters and every plugin's registered source."""
    body = request.app[METRICS].render()
    return web.Response(
        body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


async def _request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every reply carries X-Request-Id, also the ones not made by the request handler (ops,
    admin, 404s); the handler's own replies already carry their request's id."""
    if "X-Request-Id" not in response.headers:
        response.headers["X-Request-Id"] = new_request_id()


async def _allowed_methods(request: web.Request) -> set[str]:
    """The methods the routes of ``request.path`` accept (empty: no route has this path)."""
    allowed: set[str] = set()
    catch_all = request.match_info.route.resource  # not_found's own route matches every path
    for resource in request.app.router.resources():
        if resource is catch_all:
            continue
        _, methods = await resource.resolve(request)
        allowed |= methods
    return allowed


async def not_found(request: web.Request) -> web.Response:
    """Unknown path (404), or wrong method on a known one (405 with ``Allow``), in the route's
    error shape; OPTIONS on a known path is a 204 with ``Allow``."""
    dialect = _dialect_of(request)
    allowed = await _allowed_methods(request)
    if allowed:
        allow = ", ".join(sorted(allowed | {"OPTIONS"}))
        if request.method == "OPTIONS":
            return web.Response(status=204, headers={"Allow": allow})
        exc = Reject(
            405,
            f"method {request.method} is not allowed on {request.path}",
            code="method_not_allowed",
            headers={"Allow": allow},
        )
    else:
        exc = Reject(404, f"unknown path {request.path}", code="not_found")
    return web.Response(
        status=exc.status,
        body=reject_body(exc, dialect),  # type: ignore[arg-type]
        content_type="application/json",
        headers=exc.headers,
    )
