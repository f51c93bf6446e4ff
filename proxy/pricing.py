"""What a request is billed and what it costs: the rules of the usage row, as functions.

Shared facts of the request vocabulary, like ``proxy.context.UNBILLED_ENDPOINTS``: the metering
plugin writes these figures into the usage row, and a plugin that keeps a running total of the
same money (the budgets plugin) calls the same functions, so a budget and the invoice never
disagree on what a request was worth (plugins never import each other). Pure functions of the request context
(no I/O), cheap enough for the ``log`` phase of every request.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from proxy.context import STREAM_BROKEN, UNBILLED_ENDPOINTS, RequestContext

ENDED_EARLY = frozenset({"client_disconnected", STREAM_BROKEN})
"""A stream's ``error_code`` when it ended before its reply did: its tokens may be estimated."""


def request_price(
    ctx: RequestContext,
    prices: Mapping[str, float],
    tier_prices: Mapping[str, Mapping[str, float]],
) -> float:
    """``price_usd``: the feature's price per request (the tier's override wins) for a request
    answered with status < 400, cache hits included; 0 for failures and refusals."""
    if ctx.status >= 400 or ctx.status == 0 or ctx.endpoint in UNBILLED_ENDPOINTS:
        return 0.0
    return feature_price(ctx, prices, tier_prices)


def feature_price(
    ctx: RequestContext,
    prices: Mapping[str, float],
    tier_prices: Mapping[str, Mapping[str, float]],
) -> float:
    """The price of the request's feature for the caller's tier, whatever the outcome (what a
    successful request will be billed: a budget reserves it at admission)."""
    return feature_price_of(
        ctx.principal.tier if ctx.principal else None, ctx.feature, prices, tier_prices
    )


def feature_price_of(
    tier: str | None,
    feature: str | None,
    prices: Mapping[str, float],
    tier_prices: Mapping[str, Mapping[str, float]],
) -> float:
    """USD per request of ``feature`` on ``tier``: the tier's override, else the feature's."""
    feature = feature or ""
    override = tier_prices.get(tier or "")
    if override is not None and feature in override:
        return override[feature]
    return prices.get(feature, 0.0)


def prompt_tokens_estimate(body: Mapping[str, object]) -> int:
    """About one token per 4 bytes of the prompt's JSON (chat and messages, legacy
    completions, or Responses): the estimate of a stream that ended before its counts."""
    prompt = body.get("messages") or body.get("prompt") or body.get("input")
    return len(orjson.dumps(prompt)) // 4


def billed_tokens(ctx: RequestContext) -> tuple[int, int, bool]:
    """Input and output tokens of the usage row, and whether they are estimated: the
    provider's counts, or for a stream that ended early without its closing counts, output =
    content events relayed (about one token each) and input = prompt bytes / 4."""
    usage = ctx.usage
    inp, out, estimated = usage.input_tokens, usage.output_tokens, False
    if ctx.stream and ctx.error_code in ENDED_EARLY:
        # the provider's closing counts win once they arrived (an Anthropic message_start
        # carries only a placeholder output count, so it is not final)
        if not usage.final:
            out = max(out, usage.events)
            if not inp:
                inp = prompt_tokens_estimate(ctx.body)
            estimated = True
    return inp, out, estimated


def request_cost_nano(ctx: RequestContext) -> int:
    """``cost_usd`` in billionths of a dollar (the usage table's DECIMAL(18, 9) scale): the
    tokens at the route's per-million prices; 0 for a cache hit, a coalesced follower, an
    unbilled endpoint or a model without a price (whose row has cost NULL)."""
    route = ctx.route
    if (
        route is None
        or route.input_per_mtok is None
        or ctx.cache == "hit"
        or ctx.shared == "coalesced"
        or ctx.endpoint in UNBILLED_ENDPOINTS
    ):
        return 0
    inp, out, _ = billed_tokens(ctx)
    return round(inp * route.input_per_mtok * 1000 + out * (route.output_per_mtok or 0.0) * 1000)
