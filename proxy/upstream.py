"""Provider calls: one pooled ClientSession, timeouts, retries before the first byte.

Retries cover what a provider can fail on without having done the work: connection errors,
429 and 5xx. They wait with exponential backoff and full jitter, honour ``Retry-After`` up to
the policy's cap, and happen only before any byte reached the client (a stream already
relaying is never replayed). A read timeout is not retried: the provider may be generating,
and billing, the answer.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from proxy.context import Dialect, RequestContext, UpstreamRequest, UpstreamResponse
from proxy.errors import Reject
from proxy.policy import Provider

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
FALLBACK_STATUSES = RETRY_STATUSES
"""Provider statuses that send a request on to its fallback routes (after the retries)."""

_NOT_FORWARDED = frozenset(
    {
        # hop-by-hop (RFC 9110 7.6.1) and framing that aiohttp sets itself
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "accept-encoding",
        # the body is always sent plain: the client's encoding was undone when it was read
        "content-encoding",
        # the client's credentials belong to Tollway, never to the provider
        "authorization",
        "x-api-key",
        "api-key",
        "cookie",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
    }
)

# Headers that act on the operator's provider account (organisation, project, beta features
# and their billing): a tenant must not choose them, so they pass only where the provider's
# ``forward_headers`` lists them. anthropic-version is the exception: it pins the API
# version, not the account, and clients' SDKs set it.
_ACCOUNT_PREFIXES = ("openai-", "anthropic-", "x-openai-", "x-anthropic-")
_ACCOUNT_EXCEPTIONS = frozenset({"anthropic-version"})

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def forwardable(name: str) -> None:
    """Refuse (ValueError) a ``forward_headers`` entry that may never reach a provider."""
    lk = name.lower()
    if not _TOKEN.match(name):
        raise ValueError(f"{name!r} is not a header name")
    if lk in _NOT_FORWARDED or lk.startswith("x-tollway-"):
        raise ValueError(
            f"{name} is never forwarded (a credential, framing or Tollway's own header)"
        )


def _account_header(lk: str) -> bool:
    return lk.startswith(_ACCOUNT_PREFIXES) and lk not in _ACCOUNT_EXCEPTIONS


_OPENAI_PATHS = {
    "chat": "/chat/completions",
    "messages": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
    "responses": "/responses",  # only for providers serving it (a route's native_responses)
}

_NAMES_KEPT = 1024

_RELAYED_BACK = ("content-type", "openai-processing-ms", "retry-after")
UPSTREAM_ID = "x-upstream-request-id"
"""The reply header with the provider's request id (OpenAI's ``x-request-id``, Anthropic's
``request-id``): the client's ``X-Request-Id`` and ``request-id`` are the gateway's own."""


@dataclass(slots=True, frozen=True)
class ProviderClient:
    """A provider's precomputed URLs, credentials and timeouts."""

    name: str
    kind: Dialect
    base_url: str
    auth_headers: tuple[tuple[str, str], ...]
    timeout: aiohttp.ClientTimeout
    attempts: int
    backoff: float
    max_backoff: float
    default_max_tokens: int
    # provider-account header names (lowercase) the policy lets clients set
    allowed: frozenset[str] = frozenset()
    # client header name as sent -> the name forwarded ("" = not forwarded); see ``headers``
    forwarded_names: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, name: str, p: Provider) -> ProviderClient:
        key = p.api_key.get_secret_value() if p.api_key else None
        if p.kind == "anthropic":
            auth: list[tuple[str, str]] = [("anthropic-version", p.anthropic_version)]
            if key:
                auth.append(("x-api-key", key))
        else:
            auth = [("authorization", f"Bearer {key}")] if key else []
        return cls(
            name=name,
            kind=p.kind,
            base_url=p.base_url.rstrip("/"),
            auth_headers=tuple(auth),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=p.timeout.connect, sock_read=p.timeout.read
            ),
            attempts=p.retries.attempts,
            backoff=p.retries.backoff,
            max_backoff=p.retries.max_backoff,
            default_max_tokens=p.default_max_tokens,
            allowed=frozenset(h.lower() for h in p.forward_headers),
        )

    def url(self, endpoint: str) -> str:
        """The provider URL of a client endpoint, in the provider's dialect."""
        if self.kind == "anthropic":
            return self.base_url + "/v1/messages"
        return self.base_url + _OPENAI_PATHS[endpoint]

    def headers(self, client_headers: CIMultiDictProxy[str]) -> dict[str, str]:
        """Client headers minus hop-by-hop, credentials, Tollway's own and the provider-account
        headers the policy does not allow; plus the provider's credentials.

        Which names pass is decided once per distinct name (clients send the same few headers
        on every request), not lowercased and tested again for each request.
        """
        names = self.forwarded_names
        out: dict[str, str] = {}
        for k, v in client_headers.items():
            lk = names.get(k)
            if lk is None:
                lk = self._forwarded_name(k)
            if lk:
                out[lk] = v
        connection = client_headers.get("connection")
        if connection:  # names listed in Connection are hop-by-hop too (RFC 9110 7.6.1)
            for name in connection.split(","):
                out.pop(name.strip().lower(), None)
        for k, v in self.auth_headers:
            if k == "anthropic-version" and k in out:
                continue  # the client may pin its own API version
            out[k] = v
        out["content-type"] = "application/json"
        return out

    def _forwarded_name(self, name: str) -> str:
        lk = name.lower()
        if (
            lk in _NOT_FORWARDED
            or lk.startswith("x-tollway-")
            or (_account_header(lk) and lk not in self.allowed)
            or (self.kind == "openai" and lk == "anthropic-version")
        ):
            lk = ""
        names = self.forwarded_names
        if len(names) >= _NAMES_KEPT:  # names are the client's to choose: keep the memo bounded
            names.clear()
        names[name] = lk
        return lk


def _retry_after(headers: CIMultiDictProxy[str]) -> float | None:
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _backoff(attempt: int, base: float, cap: float) -> float:
    return random.uniform(0, min(cap, base * (2**attempt)))


def relay_headers(upstream: CIMultiDictProxy[str]) -> dict[str, str]:
    """The few provider reply headers worth passing to the client."""
    out = {}
    for k in _RELAYED_BACK:
        v = upstream.get(k)
        if v is not None:
            out[k] = v
    rid = upstream.get("x-request-id") or upstream.get("request-id")
    if rid:
        out[UPSTREAM_ID] = rid
    return out


async def send(
    session: aiohttp.ClientSession,
    client: ProviderClient,
    ctx: RequestContext,
    req: UpstreamRequest,
    payload: bytes,
) -> UpstreamResponse:
    """Send ``payload`` to the provider with retries; return a body or a live chunk iterator.

    Raises Reject(502) when the provider cannot be reached and Reject(504) on a timeout.
    """
    attempt = 0
    while True:
        tried = time.perf_counter()
        try:
            resp = await session.request(
                req.method, req.url, data=payload, headers=req.headers, timeout=client.timeout
            )
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as e:
            if attempt < client.attempts:
                _retried(ctx, tried, attempt, client.name, 0, type(e).__name__)
                await asyncio.sleep(_backoff(attempt, client.backoff, client.max_backoff))
                attempt += 1
                ctx.retries = attempt
                continue
            raise Reject(
                502, f"upstream provider {client.name} is unreachable", code="upstream_unreachable"
            ) from e
        except (TimeoutError, aiohttp.ClientError) as e:
            raise _failure(client, e, f"failed: {type(e).__name__}") from e
        if resp.status in RETRY_STATUSES and attempt < client.attempts:
            wait = _retry_after(resp.headers)
            if wait is None:
                wait = _backoff(attempt, client.backoff, client.max_backoff)
            if wait <= client.max_backoff:
                resp.release()
                _retried(ctx, tried, attempt, client.name, resp.status, None)
                await asyncio.sleep(wait)
                attempt += 1
                ctx.retries = attempt
                continue
        if req.stream and resp.status == 200:
            return UpstreamResponse(
                status=resp.status,
                headers=relay_headers(resp.headers),
                chunks=_chunks(resp, client),
                release=resp.close,
            )
        try:
            body = await resp.read()
        except (TimeoutError, aiohttp.ClientError) as e:
            resp.close()
            raise _failure(client, e, "closed the connection") from e
        resp.release()
        return UpstreamResponse(status=resp.status, headers=relay_headers(resp.headers), body=body)


def _retried(
    ctx: RequestContext, start: float, attempt: int, provider: str, status: int, error: str | None
) -> None:
    """Record a provider try that is about to be retried as an ``upstream.try`` phase (the
    try that answers is the provider call itself: a request without retries records none)."""
    attrs: dict[str, Any] = {
        "tollway.provider": provider,
        "tollway.attempt": attempt + 1,
        "http.response.status_code": status,
        "error.type": error or str(status),
    }
    ctx.timings.phase("upstream.try", start, time.perf_counter(), attrs)


async def _chunks(resp: aiohttp.ClientResponse, client: ProviderClient) -> AsyncIterator[bytes]:
    """The provider's bytes as they arrive; errors become Reject (the relay turns them into an
    error event, since headers are already sent)."""
    try:
        async for chunk in resp.content.iter_any():
            yield chunk
    except (TimeoutError, aiohttp.ClientError) as e:
        raise _failure(client, e, "broke the stream") from e
    finally:
        resp.close()


def _failure(client: ProviderClient, exc: BaseException, what: str) -> Reject:
    """A timeout is a 504; any other transport failure a 502 saying ``what`` happened."""
    if isinstance(exc, TimeoutError):
        return Reject(504, f"upstream provider {client.name} timed out", code="upstream_timeout")
    return Reject(502, f"upstream provider {client.name} {what}", code="upstream_error")
