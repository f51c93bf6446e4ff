"""``POST /v1/responses/input_tokens``: the Responses API's token count, for every model.

The OpenAI SDK's ``client.responses.input_tokens.count``: a Responses request (``input``,
``instructions``, ``tools``, ``text``, ``reasoning``, ...) answered with
``{"object": "response.input_tokens", "input_tokens": N}``. As for Anthropic's count
(``proxy.counting``), the chain's request side runs like any other (auth, the tier's features
and request-rate limits, privacy, routing's ``auto``, the ``responses`` plugin expanding a
``previous_response_id``) as endpoint ``input_tokens``, one of
``proxy.context.UNBILLED_ENDPOINTS``: one zero-price usage row with the count as
``input_tokens``, no monthly quota, no tokens-per-minute, no fallbacks (another model's count
is not this model's). Then, per route (``Route.native_responses``, as ``/v1/responses``):

- native (an OpenAI provider serving the Responses API): the provider counts, at its own
  ``/responses/input_tokens``; the request goes as it came with the model replaced, and the
  reply and errors come back as the provider sent them;
- a Claude model: the request is translated as ``/v1/responses`` would translate it
  (``responses_api.upstream_body``: Responses -> chat -> messages), less what a count does
  not take (``max_tokens``, sampling, ``metadata``...), and Anthropic counts it (its
  ``/v1/messages/count_tokens``); its ``{"input_tokens": N}`` comes back in the Responses
  shape, its errors in OpenAI's;
- an OpenAI-compatible provider with only chat completions (``responses: chat``), which has no
  count endpoint: the gateway's estimate (``counting.estimate_tokens``, a token per four
  characters of every text the model reads), said so with ``X-Tollway-Count: estimate``.

A translated route refuses what ``/v1/responses`` would refuse for it (a hosted tool, a
``conversation``), and a field the count endpoint does not take (``stream``,
``max_output_tokens``...), each a 400 naming the field; a native provider judges its own.
"""

from __future__ import annotations

from aiohttp import web

from proxy import counting, responses_api
from proxy.context import RequestContext, Route, UpstreamCall
from proxy.errors import Reject
from proxy.runtime import Runtime

COUNT_PATH = "/responses/input_tokens"
"""The count's path under an OpenAI provider's ``base_url`` (which ends in ``/v1``)."""

COUNTED_FIELDS = frozenset(
    {
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "reasoning",
        "text",
        "truncation",
        "conversation",
        "previous_response_id",
        "personality",
    }
)
"""The fields ``/v1/responses/input_tokens`` takes (the SDK's ``InputTokenCountParams``)."""

_ANTHROPIC_COUNTED = (
    "model",
    "messages",
    "system",
    "tools",
    "tool_choice",
    "thinking",
    "output_config",
)
"""What Anthropic's ``count_tokens`` takes of a translated messages request; the rest
(``max_tokens``, ``metadata``, ``service_tier``) it refuses."""


def _check_fields(ctx: RequestContext, route: Route) -> None:
    """Refuse a field the count endpoint does not take, as OpenAI refuses unknown ones: a
    translated route would otherwise drop it silently (``stream`` gets no stream)."""
    for key, value in ctx.body.items():
        if key not in COUNTED_FIELDS and value is not None:
            raise Reject(
                400,
                f"Unknown parameter: '{key}'. The input token count of model {route.model!r} "
                f"takes only: {', '.join(sorted(COUNTED_FIELDS))}.",
                code="unknown_parameter",
                param=key,
            )


def _count_request(rt: Runtime, ctx: RequestContext, route: Route) -> tuple[str, dict[str, object]]:
    """The provider URL ("" for an estimate, which is never sent) and body of the count."""
    client = rt.providers[route.provider]
    if route.native_responses:
        body = dict(ctx.body)
        body["model"] = route.upstream_model
        return client.base_url + COUNT_PATH, body
    _check_fields(ctx, route)
    _, translated = responses_api.upstream_body(ctx.body, route, client.default_max_tokens)
    if route.kind != "anthropic":
        body = dict(ctx.body)
        body["model"] = route.upstream_model
        return "", body
    if not translated.get("messages"):
        raise Reject(
            400,
            f"'input' is required to count tokens for model {route.model!r}: its provider "
            "counts messages, and there is none",
            code="missing_required_parameter",
            param="input",
        )
    body = {k: translated[k] for k in _ANTHROPIC_COUNTED if k in translated}
    return client.base_url + counting.COUNT_PATH, body


async def count(
    rt: Runtime, ctx: RequestContext, route: Route, call: UpstreamCall
) -> web.StreamResponse:
    """Answer an input_tokens request whose request side has run: ``route`` will serve it
    (Anthropic's count reshaped into the Responses API's on the way back)."""
    ctx.fallbacks = ()
    url, body = _count_request(rt, ctx, route)
    return await counting.send_count(rt, ctx, route, call, url, body, responses_api.count_reply)
