"""``POST /v1/messages/count_tokens``: Anthropic's token counting, for every model.

The request runs the chain's request side like any other (auth, the tier's features and
request-rate limits, privacy, routing's ``auto``) as endpoint ``count_tokens``, one of
``proxy.context.UNBILLED_ENDPOINTS``: metered as a zero-price call, as counting costs nothing
at the provider and is not sold. It takes no monthly quota and no tokens-per-minute, and its
usage row has the count as ``input_tokens``, no output, ``cost_usd`` and ``price_usd`` 0. Then:

- a model of an Anthropic provider: the provider counts (its ``/v1/messages/count_tokens``),
  with the usual retries and no fallbacks (another model's count is not this model's);
- any other model: the gateway estimates, and says so (``X-Tollway-Count: estimate``): a
  token per four characters of every text the model reads (``proxy.texts``: the system
  prompt, messages, tool calls and results, tool definitions), rounded up, at least 1; the
  rule routing scores prompts by. Not the provider's tokenizer, and binary content (images,
  PDFs) is not counted.

Both run the ``upstream_request`` hooks first (a model outside the caller's plan is refused as
for a message); an estimate's request has no URL, as it is never sent. The Responses API's
count, ``POST /v1/responses/input_tokens``, is ``proxy.input_tokens``, built on this one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from proxy import relay
from proxy.context import Reply, RequestContext, Route, UpstreamCall, UpstreamRequest
from proxy.errors import Reject
from proxy.runtime import Runtime
from proxy.texts import text_slots

COUNT_PATH = "/v1/messages/count_tokens"
ESTIMATE_HEADERS = {"X-Tollway-Count": "estimate"}


def estimate_tokens(body: dict[str, object]) -> int:
    """The gateway's estimate of a request's input tokens: characters / 4, rounded up."""
    chars = sum(len(container[key]) for container, key in text_slots(body))
    return max(1, -(-chars // 4))


async def count_tokens(
    rt: Runtime, ctx: RequestContext, route: Route, call: UpstreamCall
) -> web.StreamResponse:
    """Answer a count_tokens request whose request side has run: ``route`` will serve it."""
    messages = ctx.body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Reject(400, "messages: must be a non-empty list of messages", param="messages")
    ctx.fallbacks = ()
    native = route.kind == "anthropic"
    body = dict(ctx.body)
    body["model"] = route.upstream_model
    url = rt.providers[route.provider].base_url + COUNT_PATH if native else ""
    return await send_count(rt, ctx, route, call, url, body, _estimate_reply)


def _estimate_reply(tokens: int) -> dict[str, Any]:
    """An estimate in the shape of Anthropic's count."""
    return {"input_tokens": tokens}


async def send_count(
    rt: Runtime,
    ctx: RequestContext,
    route: Route,
    call: UpstreamCall,
    url: str,
    body: dict[str, object],
    estimate_reply: Callable[[int], dict[str, Any]],
) -> web.StreamResponse:
    """Count ``body`` at the provider's ``url``, or estimate it when ``url`` is "" (the reply
    body ``estimate_reply`` makes of the count, marked ``X-Tollway-Count: estimate``). The
    ``upstream_request`` hooks run on both, so a model outside the caller's plan is refused
    alike; a sent count passes the ``send_upstream`` hooks and is relayed like any reply."""
    chain = rt.chain.for_endpoint(ctx.endpoint)
    req = UpstreamRequest(
        method="POST",
        url=url,
        headers=rt.providers[route.provider].headers(ctx.request.headers) if url else {},
        body=body,
        provider=route.provider,
        kind=route.kind,
        stream=False,
    )
    for hook in chain.upstream_request:
        await hook(ctx, req)
    if not url:
        counted = ctx.usage.input_tokens = estimate_tokens(req.body)  # not reported: estimated
        reply = Reply(body=estimate_reply(counted), headers=dict(ESTIMATE_HEADERS))
        return await relay.send_reply(chain, ctx, reply, len(chain.plugins))
    resp = None
    for hook in chain.send_upstream:  # a plugin may take the call over (coalescing)
        resp = await hook(ctx, req, call)
        if resp is not None:
            break
    if resp is None:
        resp = await call(req)
    try:
        return await relay.relay_body(chain, ctx, route, resp)  # a translated count reshaped there
    finally:
        if resp.release is not None:
            resp.release()
