"""Several choices from a provider that answers one per call: ``n`` > 1 to a Claude model.

OpenAI's ``n`` asks for n alternative answers in one reply; Anthropic's Messages API has no
such field, and dropping it would hand the client one choice where it asked for several. So
the gateway makes the n calls itself, at once, and answers as OpenAI would: one
``chat.completion`` with choices 0..n-1. The usage is the sum of the n calls (each call reads
the prompt again, and the provider bills each), so metering and quotas count what was spent.

This is the provider call of such a request (``handler.call_provider`` picks it), so a
``send_upstream`` plugin (coalescing) still shares the whole n-choice answer between identical
requests, and a failure still falls back to the request's next route. A request with one
choice never comes here. A stream with several choices is refused before the call
(``translate.options.choices``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import orjson

from proxy import translate, upstream
from proxy.context import RequestContext, UpstreamRequest, UpstreamResponse
from proxy.errors import Reject


def wanted(ctx: RequestContext, req: UpstreamRequest) -> int:
    """How many choices the gateway must gather for this call: the client's ``n`` when an
    OpenAI chat client's call goes to an Anthropic provider, else 1 (the provider's own
    ``n``, if any, does it)."""
    if req.kind != "anthropic" or ctx.dialect != "openai" or ctx.endpoint != "chat":
        return 1
    n = ctx.body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1


async def send(
    session: Any,
    client: upstream.ProviderClient,
    ctx: RequestContext,
    req: UpstreamRequest,
    payload: bytes,
    n: int,
) -> UpstreamResponse:
    """Send ``payload`` n times at once; one OpenAI reply with n choices, or the first failure.

    The reply is already in the client's dialect, so its ``route`` is the call's route with
    kind ``openai``: the relay reads its usage and sends it as it is.
    """
    results = await asyncio.gather(
        *(upstream.send(session, client, ctx, req, payload) for _ in range(n)),
        return_exceptions=True,
    )
    failure: UpstreamResponse | BaseException | None = None
    for result in results:
        if isinstance(result, BaseException):
            if not isinstance(result, Reject):
                raise result
            failure = failure or result
        elif result.status >= 300 and failure is None:
            failure = result
    if failure is not None:
        for result in results:
            if isinstance(result, UpstreamResponse) and result is not failure and result.release:
                result.release()
        if isinstance(failure, BaseException):
            raise failure
        return failure
    replies = [r for r in results if isinstance(r, UpstreamResponse)]
    route = ctx.route
    assert route is not None  # the handler routed the request before calling
    return UpstreamResponse(
        status=200,
        headers=replies[0].headers,
        body=orjson.dumps(merge([r.body or b"" for r in replies], ctx.model)),
        route=dataclasses.replace(route, kind="openai"),
    )


def merge(bodies: list[bytes], model: str) -> dict[str, Any]:
    """n Anthropic messages -> one ``chat.completion``: choice i is reply i, usage the sum."""
    try:
        replies = [translate.messages_response_to_chat(orjson.loads(b), model) for b in bodies]
    except (orjson.JSONDecodeError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise Reject(
            502, "upstream provider returned a malformed reply", code="upstream_invalid"
        ) from e
    out = replies[0]
    out["choices"] = [dict(r["choices"][0], index=i) for i, r in enumerate(replies)]
    prompt = sum(r["usage"]["prompt_tokens"] for r in replies)
    completion = sum(r["usage"]["completion_tokens"] for r in replies)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    cached = sum(
        (r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) for r in replies
    )
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    out["usage"] = usage
    return out
