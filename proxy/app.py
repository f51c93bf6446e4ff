"""create_app(policy) -> web.Application: routes, resources, lifecycle.

Resources are opened with aiohttp's ``cleanup_ctx`` (open, yield, close): the pooled upstream
session first, then the chain's plugin lifespans, closed in reverse on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy import admin, catalog, selfservice, tasks
from proxy import keystore as keystore_module
from proxy.appkeys import GATEWAY, KEYSTORE, METRICS, RESOURCES
from proxy.chain import Chain, compile_chain
from proxy.errors import Reject, reject_body
from proxy.gateway import Gateway
from proxy.handler import make_handler, request_dialect, with_request_id
from proxy.keystore import KeyStore
from proxy.keysync import KeySync
from proxy.policy import LoadedPolicy, PolicyError
from proxy.resources import Resources
from proxy.runtime import Runtime
from proxy.statewatch import STATE_WATCH, StateWatch

log = logging.getLogger("tollway")

CLIENT_ENDPOINTS = {
    "/v1/chat/completions": ("chat", "openai"),
    "/v1/completions": ("completions", "openai"),
    "/v1/embeddings": ("embeddings", "openai"),
    "/v1/responses": ("responses", "openai"),
    "/v1/responses/input_tokens": ("input_tokens", "openai"),
    "/v1/messages": ("messages", "anthropic"),
    "/v1/messages/count_tokens": ("count_tokens", "anthropic"),
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
    app[GATEWAY] = gw
    app[KEYSTORE] = keystore
    app[RESOURCES] = Resources()
    app[METRICS] = gw.metrics
    gw.app = app
    app.cleanup_ctx.append(_upstream_session)
    state = loaded.policy.state
    if state.distributed:
        watch = StateWatch(state.url, state.on_unavailable, state.check_interval)
        app[RESOURCES].put(STATE_WATCH, watch)  # limits and quotas fall back on what it reports
        gw.keysync = KeySync(keystore, state.url, watch)
        app.cleanup_ctx.append(_key_sync)
    app.cleanup_ctx.append(_key_prune)
    app.cleanup_ctx.append(_chain_lifespan)
    app.on_shutdown.append(_shutdown_begins)
    for path, (endpoint, dialect) in CLIENT_ENDPOINTS.items():
        app.router.add_post(path, make_handler(endpoint, dialect))  # type: ignore[arg-type]
    # the client endpoints' replies carry their request's id; every other route's is stamped
    app.router.add_get("/v1/models", with_request_id(catalog.list_models))
    app.router.add_get("/v1/models/{model_id}", with_request_id(catalog.get_model))
    app.router.add_get("/healthz", with_request_id(healthz))
    app.router.add_get("/readyz", with_request_id(readyz))
    app.router.add_get("/metrics", with_request_id(metrics))
    admin.add_routes(app, with_request_id)
    selfservice.add_routes(app, with_request_id)  # /v1/tollway/usage, /usage
    _add_plugin_routes(app, chain)
    app.router.add_route("*", "/{tail:.*}", with_request_id(not_found))
    return app


def _add_plugin_routes(app: web.Application, chain: Chain) -> None:
    """Serve the routes plugins added (``register_routes``) beside the core's own.

    aiohttp's router is fixed once the server starts, so each route is registered once, with a
    handler that finds the route in the chain live when a request arrives: after a reload the
    new plugin instance answers, and a route the new chain dropped is a 404. A route that would
    shadow one of the core's is refused like a config error, naming the plugin.
    """
    taken = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource}
    clashes = [
        chain.loaded.error(
            ("chain", _chain_index(chain, route.plugin)),
            f"route {method} {path} is the gateway's own",
        )
        for (method, path), route in chain.routes.items()
        if (method, path) in taken or ("*", path) in taken
    ]
    if clashes:
        raise PolicyError(clashes)
    for key, route in chain.routes.items():
        handler = with_request_id(_plugin_route(key))
        web.RouteDef(route.method, route.path, handler, route.kwargs).register(app.router)
    app[GATEWAY].route_keys = frozenset(chain.routes)


def _chain_index(chain: Chain, name: str) -> int:
    return next(i for i, item in enumerate(chain.loaded.policy.chain) if item.name == name)


def _plugin_route(key: tuple[str, str]) -> Callable[[web.Request], Any]:
    """The handler registered for one plugin route: runs the live chain's handler for it,
    counted in that chain's requests so a reload closes its plugins only after it finished."""

    async def handle(request: web.Request) -> web.StreamResponse:
        gw = request.app[GATEWAY]
        chain = gw.runtime.chain
        route = chain.routes.get(key)
        try:
            if route is None:  # the policy was reloaded without the plugin that added it
                raise Reject(404, f"unknown path {request.path}", code="not_found")
            chain.in_flight += 1
            try:
                return await route.handler(request)  # type: ignore[no-any-return]
            finally:
                chain.in_flight -= 1
                if chain.retired and chain.in_flight == 0:
                    gw.retire(chain)
        except Reject as e:
            exc = e
        except web.HTTPException:
            raise  # the plugin's own answer (a redirect, a 404 of its own)
        except Exception:
            # %r: a decoded path may hold a newline (%0A) that would forge a log line
            log.exception("plugin %s route %s %r failed", route and route.plugin, *key)
            exc = Reject(500, "internal gateway error", code="internal_error")
        return web.Response(
            status=exc.status,
            body=reject_body(exc, request_dialect(request)),
            content_type="application/json",
            headers=exc.headers,
        )

    return handle


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    # No connection cap here: admission control is the limits plugin's job, not the pool's.
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
    gw.session = aiohttp.ClientSession(connector=connector)
    yield
    await gw.session.close()


async def _key_sync(app: web.Application) -> AsyncIterator[None]:
    sync = app[GATEWAY].keysync
    watch = app[RESOURCES].find(STATE_WATCH)
    assert sync is not None and watch is not None
    await watch.start()
    app[RESOURCES].on_shutdown(watch.pause)  # no re-seeding while the plugins close
    await sync.start()  # every issued key is known before the gateway serves
    yield
    await sync.stop()
    await watch.stop()


async def _prune_keys(app: web.Application) -> None:
    """Every ``PRUNE_EVERY`` seconds: drop retired secrets whose grace period ended, here and
    in Redis (the request path only compares ``grace_until``; this keeps storage from
    growing with every rotation)."""
    gw = app[GATEWAY]
    while True:
        await asyncio.sleep(keystore_module.PRUNE_EVERY)
        try:
            spent = gw.keystore.prune()
            if spent and gw.keysync is not None:
                await gw.keysync.forget(spent)  # else the next sync drops them from Redis
        except Exception as e:  # a full disk, an unreachable Redis: try again next time
            log.warning("pruning retired key secrets failed (%s)", type(e).__name__)


async def _key_prune(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.get_running_loop().create_task(_prune_keys(app))
    yield
    await tasks.stop(task, "the key pruner")


async def _chain_lifespan(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    await gw.runtime.chain.start(app)
    gw.ready = True
    yield
    gw.ready = False
    await gw.close()
    await app[RESOURCES].close()


async def _shutdown_begins(app: web.Application) -> None:
    """The listener is closed; in-flight requests get ``listen.shutdown_timeout`` from now.

    Readiness goes off, and what plugins registered with ``Resources.on_shutdown`` runs now (an
    admin query is stopped and answered at once rather than holding the shutdown open until
    its handler is cancelled)."""
    app[GATEWAY].ready = False
    await app[RESOURCES].shutdown()


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
    dialect = request_dialect(request)
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
        body=reject_body(exc, dialect),
        content_type="application/json",
        headers=exc.headers,
    )
