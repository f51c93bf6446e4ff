"""The one request handler: read -> request side -> upstream -> relay -> log.

No feature logic lives here: the handler parses the body once, runs the compiled chain's
phases in plain loops, builds the provider request (translating between the OpenAI and
Anthropic dialects when the model's provider speaks the other one), and hands the reply to
``relay``. Every failure becomes a provider-shaped error; ``log`` hooks always run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, MutableMapping
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from proxy import choices, counting, input_tokens, relay, responses_api, translate, upstream
from proxy.appkeys import GATEWAY
from proxy.body import read_body
from proxy.chain import Chain
from proxy.context import (
    UNBILLED_ENDPOINTS,
    Dialect,
    Endpoint,
    Principal,
    RequestContext,
    Route,
    UpstreamRequest,
    UpstreamResponse,
)
from proxy.edge import MAX_JSON_DEPTH, too_deep, undecodable_header
from proxy.errors import Reject
from proxy.failurelog import ErrorLog
from proxy.runtime import Runtime

log = logging.getLogger("tollway")
ERRORS = ErrorLog(log)
"""Internal errors and failing ``log`` hooks: a traceback for the first of each kind, then a
count once per interval (an outage that fails every request must not flood the log)."""

_ANONYMOUS = Principal(user_id="anonymous")
_IDS_PER_DRAW = 512


def _random_ids() -> Iterator[str]:
    """``req_`` + 96 random bits (os.urandom), drawn 512 at a time.

    Ids are idempotent metering keys, so they must be unique across processes; and they are
    shown to clients, so they must not reveal traffic volume (a counter would) nor let one id
    predict the next (os.urandom, not a seeded PRNG). One urandom call per id costs ~1 µs;
    drawing in blocks brings it to ~0.3 µs, what the counter cost.
    """
    while True:
        block = os.urandom(12 * _IDS_PER_DRAW).hex()
        for i in range(0, len(block), 24):
            yield "req_" + block[i : i + 24]


_IDS = _random_ids()


def _reseed_ids() -> None:
    global _IDS
    _IDS = _random_ids()  # a forked child must not hand out its parent's remaining ids


os.register_at_fork(after_in_child=_reseed_ids)


def new_request_id() -> str:
    """A fresh random request id, ``req_`` + 24 hex digits."""
    return next(_IDS)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def with_request_id(handler: Handler) -> Handler:
    """``handler`` with an ``X-Request-Id`` on its reply (unless it set one or sent it itself),
    and Anthropic's ``request-id`` with the same id for an Anthropic client (``_stamp``).

    Every reply carries the header. The client endpoints' replies get their request's id from
    ``relay``; the other routes (ops, admin, dashboard, plugin routes, 404s) are wrapped in
    this when registered. An aiohttp ``on_response_prepare`` receiver would cover them too,
    but it runs for every response, the client endpoints' included: ~7k instructions per
    request (bench/instructions.py), of the ~90k the empty chain adds to the bare proxy. A
    handler that prepares its reply itself (a stream) sets the header itself.
    """

    async def stamped(request: web.Request) -> web.StreamResponse:
        try:
            resp = await handler(request)
        except web.HTTPException as e:  # aiohttp's own answers (a redirect, a 413) too
            if "X-Request-Id" not in e.headers:
                _stamp(request, e.headers, new_request_id())
            raise
        if not resp.prepared and "X-Request-Id" not in resp.headers:
            _stamp(request, resp.headers, new_request_id())
        return resp

    return stamped


def request_dialect(request: web.Request) -> Dialect:
    """The API shape a request outside the client endpoints is answered in: Anthropic's on
    ``/v1/messages*`` or when the client sent ``anthropic-version`` (its SDK always does)."""
    if request.path.startswith("/v1/messages") or "anthropic-version" in request.headers:
        return "anthropic"
    return "openai"


def _stamp(request: web.Request, headers: MutableMapping[str, str], request_id: str) -> None:
    """The request id headers: ``X-Request-Id``, and Anthropic's ``request-id`` (what its SDK
    reads as ``_request_id``) for an Anthropic client, with the same id."""
    headers["X-Request-Id"] = request_id
    if request_dialect(request) == "anthropic":
        headers["request-id"] = request_id


async def read_json(
    request: web.Request, max_body: int, encodings: Collection[str] = ()
) -> dict[str, Any]:
    """The request body as a JSON object, or a Reject with the right status."""
    ctype = request.headers.get("content-type", "")
    if ctype and not ctype.split(";", 1)[0].strip().lower().endswith("json"):
        raise Reject(
            415,
            f"Content-Type must be application/json, not {ctype!r}",
            code="unsupported_media_type",
        )
    raw = await read_body(request, max_body, encodings)  # bounded after decompression too
    if not raw:
        raise Reject(400, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise Reject(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise Reject(400, "request body must be a JSON object", code="invalid_json")
    # orjson parses deeper than it writes: refuse before anything writes it. A body with fewer
    # brackets than the limit cannot nest deeper, so the usual request skips the check; one
    # that parsed has as many closing brackets, so a short one is not even counted.
    if (
        len(raw) > 2 * MAX_JSON_DEPTH
        and raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH
        and too_deep(body)
    ):
        raise Reject(
            400,
            f"request body nests objects and arrays deeper than {MAX_JSON_DEPTH} levels",
            code="invalid_request",
        )
    return body


async def authenticate(rt: Runtime, ctx: RequestContext) -> Principal:
    """The caller of a request outside the client endpoints (``GET /v1/models``, ...)."""
    return await _authenticate(rt.chain.authenticate, ctx)


async def _authenticate(hooks: tuple[Any, ...], ctx: RequestContext) -> Principal:
    if not hooks:
        return _ANONYMOUS
    for hook in hooks:
        principal = await hook(ctx)
        if principal is not None:
            return principal  # type: ignore[no-any-return]
    raise Reject(401, "missing or invalid API key", code="invalid_api_key")


def _translated(fn: Any, *args: Any) -> dict[str, Any]:
    """Run a request translation; a body of the wrong shape is the client's error (400), and
    so is a field the provider cannot honour (400 naming it: ``proxy.translate.fields``)."""
    try:
        return fn(*args)  # type: ignore[no-any-return]
    except translate.Unsupported as e:
        raise Reject(
            400,
            f"{e.param!r} is not supported for this model, whose provider speaks the other "
            f"API: {e.reason}",
            code="unsupported_parameter",
            param=e.param,
        ) from None
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
    path: str = endpoint  # the provider endpoint (ProviderClient.url)
    if endpoint == "responses":  # passed through, or translated to chat (proxy.responses_api)
        path, out = responses_api.upstream_body(body, route, client.default_max_tokens)
    elif route.kind == "anthropic":
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
        url=client.url(path),
        headers=client.headers(ctx.request.headers),
        body=out,
        provider=route.provider,
        kind=route.kind,
        stream=ctx.stream,
    )
    return req, wants_usage


async def serve(rt: Runtime, ctx: RequestContext, chain: Chain) -> web.StreamResponse:
    """Run the request side, call the provider, relay the reply.

    ``chain`` is the request's endpoint view (``Chain.for_endpoint``) of the chain ``handle``
    counted it in: looked up once per request, and the same chain for every phase even if a
    reload swaps ``rt.chain`` meanwhile.
    """
    request = ctx.request
    # The key is checked on the headers alone, before the body is read: an unauthenticated
    # caller costs no upload, no inflating and no parsing (authenticate hooks see no body).
    # without authenticate hooks everyone is anonymous: no coroutine to find that out
    auth = chain.authenticate
    ctx.principal = await _authenticate(auth, ctx) if auth else _ANONYMOUS
    body = await read_json(request, rt.max_body, rt.loaded.policy.listen.request_encodings)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Reject(400, "you must provide a model parameter", code="missing_model", param="model")
    ctx.body = body
    ctx.model = model
    ctx.stream = body.get("stream") is True
    ctx.route = rt.routes.get(model)

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
    if ctx.endpoint in UNBILLED_ENDPOINTS:  # a token count: the provider's, or an estimate
        count = counting.count_tokens if ctx.endpoint == "count_tokens" else input_tokens.count
        session = request.app[GATEWAY].session
        return await count(rt, ctx, route, partial(call_provider, session, rt, ctx, chain))
    req, wants_usage = build_upstream(rt, ctx, route)
    for hook in chain.upstream_request:
        await hook(ctx, req)

    session = request.app[GATEWAY].session
    assert session is not None  # opened by the app's cleanup context before serving
    resp = None
    if chain.send_upstream:
        # an argument, never stored on ctx: no cycle for the collector (see UpstreamCall)
        call = partial(call_provider, session, rt, ctx, chain)
        for hook in chain.send_upstream:
            resp = await hook(ctx, req, call)
            if resp is not None:
                break
    if resp is None:
        resp = await call_provider(session, rt, ctx, chain, req)
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
    session: Any, rt: Runtime, ctx: RequestContext, chain: Chain, req: UpstreamRequest
) -> UpstreamResponse:
    """The core's provider call (pooled session, timeouts, retries), then the fallbacks.

    When the provider fails (a status in ``upstream.FALLBACK_STATUSES`` after the retries, or
    a transport failure: 502 or 504) and ``ctx.fallbacks`` names other routes, the next one is
    tried: its request is built from ``ctx.body`` in its own dialect and the
    ``upstream_request`` hooks run again for it. The reply that is returned carries the route
    that answered in ``route``; with every fallback failed it is the last failure.
    ``send_upstream`` plugins get it, bound to the request, as their ``call`` argument.
    An OpenAI client's ``n`` > 1 to an Anthropic provider is n calls at once (``choices``).
    """
    fell_back = False
    while True:
        failure: Reject | None = None
        resp: UpstreamResponse | None = None
        client = rt.providers[req.provider]
        try:
            if req.kind != ctx.dialect and (n := choices.wanted(ctx, req)) > 1:
                resp = await choices.send(session, client, ctx, req, orjson.dumps(req.body), n)
            else:
                resp = await upstream.send(session, client, ctx, req, orjson.dumps(req.body))
        except Reject as e:
            if not ctx.fallbacks or e.status not in (502, 504):
                raise
            failure = e
        if resp is not None and (
            not ctx.fallbacks or resp.status not in upstream.FALLBACK_STATUSES
        ):
            break
        failed = ctx.route
        nxt = await _next_fallback(rt, ctx, chain)
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
    if fell_back and resp.route is None:  # n choices carry their route already
        resp.route = ctx.route
    return resp


async def _next_fallback(rt: Runtime, ctx: RequestContext, chain: Chain) -> UpstreamRequest | None:
    """The request for the next usable fallback route (``ctx.route`` becomes it), or None.

    A route that cannot take the request (its provider lacks the endpoint, or an
    ``upstream_request`` hook refuses it, e.g. a model outside the caller's tier) is skipped.
    """
    while ctx.fallbacks:
        route = ctx.fallbacks[0]
        ctx.fallbacks = ctx.fallbacks[1:]
        previous = ctx.route
        ctx.route = route  # hooks check the route that will serve
        try:
            req, _ = build_upstream(rt, ctx, route)
            for hook in chain.upstream_request:
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
        hooks = chain.for_endpoint(endpoint)
        gw.metrics.in_flight += 1
        headers = request.headers
        # a header that is not UTF-8 is refused, and none of its values is used: its lone
        # surrogates would break the key lookup, the usage row and any hash or log of it
        bad = undecodable_header(headers)
        ctx = RequestContext(
            request_id=new_request_id(),
            endpoint=endpoint,
            dialect=dialect,
            request=request,
            client_ip=rt.client_ip(request.remote, None if bad else headers.get("x-forwarded-for")),
        )
        ctx.timings.start = time.perf_counter()
        ctx.feature = (None if bad else headers.get("x-tollway-feature")) or rt.default_feature
        try:
            if bad is not None:
                raise Reject(400, f"header {bad} is not valid UTF-8", code="invalid_header")
            return await serve(rt, ctx, hooks)
        except Reject as e:
            return await relay.send_error(hooks, ctx, e)
        except (asyncio.CancelledError, ConnectionResetError):
            ctx.status = ctx.status or 499
            ctx.error_code = "client_disconnected"
            raise
        except Exception:
            ERRORS.exception("", "internal error in request %s", ctx.request_id)
            return await relay.send_error(
                hooks, ctx, Reject(500, "internal gateway error", code="internal_error")
            )
        finally:
            ctx.timings.end = end = time.perf_counter()
            gw.metrics.in_flight -= 1
            gw.metrics.observe(endpoint, ctx.status, ctx.cache, end - ctx.timings.start)
            for hook in hooks.log:
                try:
                    await hook(ctx)
                except Exception:
                    ERRORS.exception(
                        chain.name_of(hook),
                        "log hook of plugin %s failed for request %s",
                        chain.name_of(hook),
                        ctx.request_id,
                    )
            chain.in_flight -= 1
            if chain.retired and chain.in_flight == 0:
                gw.retire(chain)

    return handle
