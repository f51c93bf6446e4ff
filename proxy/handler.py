"""The one request handler: read -> request side -> upstream -> relay -> log.

No feature logic lives here: the handler parses the body once, runs the compiled chain's
phases in plain loops, builds the provider request (translating between the OpenAI and
Anthropic dialects when the model's provider speaks the other one), and hands the reply to
``relay``. Every failure becomes a provider-shaped error; ``log`` hooks always run.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from proxy import relay, translate, upstream
from proxy.appkeys import GATEWAY
from proxy.context import (
    Dialect,
    Endpoint,
    Principal,
    RequestContext,
    Route,
    UpstreamRequest,
    UpstreamResponse,
)
from proxy.errors import Reject
from proxy.runtime import Runtime

log = logging.getLogger("tollway")

_PREFIX = os.urandom(5).hex()
_COUNTER = itertools.count(1)
_ANONYMOUS = Principal(user_id="anonymous")


def new_request_id() -> str:
    """Unique across processes (random prefix) and cheap (a counter): idempotent metering keys."""
    return f"req_{_PREFIX}{next(_COUNTER):08x}"


async def read_json(request: web.Request, max_body: int) -> dict[str, Any]:
    """The request body as a JSON object, or a Reject with the right status."""
    ctype = request.headers.get("content-type", "")
    if ctype and not ctype.split(";", 1)[0].strip().lower().endswith("json"):
        raise Reject(
            415,
            f"Content-Type must be application/json, not {ctype!r}",
            code="unsupported_media_type",
        )
    length = request.content_length
    if length is not None and length > max_body:
        raise Reject(413, f"request body exceeds {max_body} bytes", code="request_too_large")
    if length is None:  # chunked upload: stop reading as soon as it is too large
        buf = bytearray()
        while chunk := await request.content.read(65536):
            buf += chunk
            if len(buf) > max_body:
                raise Reject(
                    413, f"request body exceeds {max_body} bytes", code="request_too_large"
                )
        raw = bytes(buf)
    else:
        raw = await request.read()
    if not raw:
        raise Reject(400, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise Reject(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise Reject(400, "request body must be a JSON object", code="invalid_json")
    return body


async def authenticate(rt: Runtime, ctx: RequestContext) -> Principal:
    hooks = rt.chain.authenticate
    if not hooks:
        return _ANONYMOUS
    for hook in hooks:
        principal = await hook(ctx)
        if principal is not None:
            return principal  # type: ignore[no-any-return]
    raise Reject(401, "missing or invalid API key", code="invalid_api_key")


def _translated(fn: Any, *args: Any) -> dict[str, Any]:
    """Run a request translation; a body of the wrong shape is the client's error (400)."""
    try:
        return fn(*args)  # type: ignore[no-any-return]
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise Reject(
            400,
            f"the request cannot be translated for this model's provider: {e}",
            code="invalid_request",
        ) from None


def build_upstream(rt: Runtime, ctx: RequestContext, route: Route) -> tuple[UpstreamRequest, bool]:
    """The provider request in the provider's dialect, and whether the client asked for usage
    chunks (Tollway always asks the provider for usage; it withholds what was not asked)."""
    client = rt.providers[route.provider]
    body = ctx.body
    wants_usage = (
        bool((body.get("stream_options") or {}).get("include_usage"))
        if isinstance(body.get("stream_options"), dict)
        else False
    )
    endpoint = ctx.endpoint
    if route.kind == "anthropic":
        if endpoint == "messages":
            out = dict(body)
            out["model"] = route.upstream_model
        elif endpoint == "chat":
            out = _translated(
                translate.chat_to_messages_request,
                body,
                route.upstream_model,
                client.default_max_tokens,
            )
        else:
            raise Reject(
                400,
                f"model {route.model!r} is served by an Anthropic provider, which has no "
                f"/v1/{endpoint} endpoint",
                code="unsupported_endpoint",
                param="model",
            )
    elif endpoint == "messages":
        out = _translated(translate.messages_to_chat_request, body, route.upstream_model)
    else:
        out = dict(body)
        out["model"] = route.upstream_model
        if ctx.stream and endpoint != "embeddings":
            opts = (
                dict(body["stream_options"]) if isinstance(body.get("stream_options"), dict) else {}
            )
            opts["include_usage"] = True
            out["stream_options"] = opts
    req = UpstreamRequest(
        method="POST",
        url=client.url(endpoint),
        headers=client.headers(ctx.request.headers),
        body=out,
        provider=route.provider,
        kind=route.kind,
        stream=ctx.stream,
    )
    return req, wants_usage


async def serve(rt: Runtime, ctx: RequestContext) -> web.StreamResponse:
    """Run the request side, call the provider, relay the reply."""
    request = ctx.request
    body = await read_json(request, rt.max_body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Reject(400, "you must provide a model parameter", code="missing_model", param="model")
    ctx.body = body
    ctx.model = model
    ctx.stream = body.get("stream") is True
    ctx.route = rt.routes.get(model)
    ctx.principal = await authenticate(rt, ctx)

    chain = rt.chain
    for position, hook in chain.access:
        reply = await hook(ctx)
        if reply is not None:
            return await relay.send_reply(chain, ctx, reply, position)

    route = ctx.route
    if route is None:
        raise Reject(
            404,
            f"The model `{ctx.model}` does not exist or you do not have access to it.",
            code="model_not_found",
            param="model",
        )
    req, wants_usage = build_upstream(rt, ctx, route)
    for hook in chain.upstream_request:
        await hook(ctx, req)

    session = request.app[GATEWAY].session
    assert session is not None  # opened by the app's cleanup context before serving
    resp = None
    if chain.send_upstream:
        ctx.call_upstream = partial(call_provider, session, rt, ctx)
        for hook in chain.send_upstream:
            resp = await hook(ctx, req)
            if resp is not None:
                break
    if resp is None:
        resp = await call_provider(session, rt, ctx, req)
    if resp.route is not None:  # a fallback answered (for this request or the one it shared)
        ctx.route = route = resp.route
    try:
        if resp.chunks is not None:
            return await relay.relay_stream(chain, ctx, route, resp, wants_usage)
        return await relay.relay_body(chain, ctx, route, resp)
    finally:
        if resp.release is not None:
            resp.release()


async def call_provider(
    session: Any, rt: Runtime, ctx: RequestContext, req: UpstreamRequest
) -> UpstreamResponse:
    """The core's provider call (pooled session, timeouts, retries), then the fallbacks.

    When the provider fails (a status in ``upstream.FALLBACK_STATUSES`` after the retries, or
    a transport failure: 502 or 504) and ``ctx.fallbacks`` names other routes, the next one is
    tried: its request is built from ``ctx.body`` in its own dialect and the
    ``upstream_request`` hooks run again for it. The reply that is returned carries the route
    that answered in ``route``; with every fallback failed it is the last failure.
    ``send_upstream`` plugins reach this through ``ctx.call_upstream``.
    """
    fell_back = False
    while True:
        failure: Reject | None = None
        resp: UpstreamResponse | None = None
        try:
            resp = await upstream.send(
                session, rt.providers[req.provider], ctx, req, orjson.dumps(req.body)
            )
        except Reject as e:
            if not ctx.fallbacks or e.status not in (502, 504):
                raise
            failure = e
        if resp is not None and (
            not ctx.fallbacks or resp.status not in upstream.FALLBACK_STATUSES
        ):
            break
        failed = ctx.route
        nxt = await _next_fallback(rt, ctx)
        if nxt is None:  # none left: the last failure is the answer
            if resp is None:
                assert failure is not None
                raise failure
            break
        fell_back = True
        why = failure.status if failure is not None else resp.status if resp is not None else 0
        log.info(
            "request %s: %s failed (%s), falling back to %s",
            ctx.request_id,
            failed.model if failed else "?",
            why,
            route.model if (route := ctx.route) else "?",
        )
        req = nxt
    if fell_back:
        resp.route = ctx.route
    return resp


async def _next_fallback(rt: Runtime, ctx: RequestContext) -> UpstreamRequest | None:
    """The request for the next usable fallback route (``ctx.route`` becomes it), or None.

    A route that cannot take the request (its provider lacks the endpoint, or an
    ``upstream_request`` hook refuses it, e.g. a model outside the caller's plan) is skipped.
    """
    while ctx.fallbacks:
        route = ctx.fallbacks[0]
        ctx.fallbacks = ctx.fallbacks[1:]
        previous = ctx.route
        ctx.route = route  # hooks check the route that will serve
        try:
            req, _ = build_upstream(rt, ctx, route)
            for hook in rt.chain.upstream_request:
                await hook(ctx, req)
        except Reject:
            ctx.route = previous
            continue
        return req
    return None


def make_handler(endpoint: Endpoint, dialect: Dialect) -> Any:
    """The aiohttp handler of one client endpoint."""

    async def handle(request: web.Request) -> web.StreamResponse:
        gw = request.app[GATEWAY]
        rt = gw.runtime
        chain = rt.chain
        chain.in_flight += 1
        gw.metrics.in_flight += 1
        ctx = RequestContext(
            request_id=new_request_id(),
            endpoint=endpoint,
            dialect=dialect,
            request=request,
            client_ip=rt.client_ip(request.remote, request.headers.get("x-forwarded-for")),
        )
        ctx.timings.start = time.perf_counter()
        ctx.feature = request.headers.get("x-tollway-feature") or rt.default_feature
        try:
            return await serve(rt, ctx)
        except Reject as e:
            return await relay.send_error(chain, ctx, e)
        except (asyncio.CancelledError, ConnectionResetError):
            ctx.status = ctx.status or 499
            ctx.error_code = "client_disconnected"
            raise
        except Exception:
            log.exception("internal error in request %s", ctx.request_id)
            return await relay.send_error(
                chain, ctx, Reject(500, "internal gateway error", code="internal_error")
            )
        finally:
            ctx.timings.end = end = time.perf_counter()
            gw.metrics.in_flight -= 1
            gw.metrics.observe(endpoint, ctx.status, ctx.cache, end - ctx.timings.start)
            for hook in chain.log:
                try:
                    await hook(ctx)
                except Exception:
                    log.exception("log hook failed for request %s", ctx.request_id)
            # ctx.call_upstream (set in serve) is a partial over ctx itself: break that cycle so
            # the request's objects are freed by reference counting, not left to the cyclic
            # collector (the largest single cost under load before; tests/proxy/test_cycles.py)
            ctx.call_upstream = None
            chain.in_flight -= 1
            if chain.retired and chain.in_flight == 0:
                gw.retire(chain)

    return handle
