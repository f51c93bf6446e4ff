"""The plugin API: every hook Tollway calls, each docstring its reference.

pluggy declares these hooks, registers plugins and checks them at startup (unknown hook names,
wrong argument names). pluggy is *not* called per request: ``compile_chain`` turns the enabled
plugins into per-phase tuples of bound methods in ``chain:`` order and the handler awaits them
in a plain loop. So the results rules below are Tollway's, applied by the core, not pluggy's.

Order: the request side (``authenticate``, ``access``, ``upstream_request``, ``send_upstream``)
runs top to bottom of ``chain:``; the response side (``response_headers``, ``response_chunk``,
``response_body``) bottom to top. If ``access`` of the plugin at position k returns a Reply, the
response side runs only for plugins above k. ``log`` runs for every plugin, always.

Every hook except ``lifespan`` and ``response_chunk`` must be ``async def``; a plugin with a
synchronous implementation of an async hook is refused at startup.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from aiohttp import web

    from proxy.context import (
        Principal,
        Reply,
        RequestContext,
        StreamEvent,
        UpstreamRequest,
        UpstreamResponse,
    )

PROJECT = "tollway"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def lifespan(app: web.Application) -> AsyncIterator[None]:
    """Open and close the plugin's resources (databases, background workers).

    Write it as an async generator: code before ``yield`` runs when the chain starts serving,
    code after it when the chain is retired (shutdown, or after a policy reload once its last
    in-flight request finished). Entered in ``chain:`` order, exited in reverse.
    """
    raise NotImplementedError  # a spec has no body; plugins implement it


@hookspec(firstresult=True)
async def authenticate(ctx: RequestContext) -> Principal | None:
    """Identify the caller.

    :param ctx: the request; ``ctx.request`` gives the headers. It runs before the body is
        read (an unauthenticated caller must cost no upload, inflating or parsing), so
        ``ctx.body``, ``ctx.model`` and ``ctx.route`` are still empty here.
    :return: the first non-None Principal wins and is stored in ``ctx.principal``.
    Raise ``Reject(401)`` to refuse. If plugins implement this hook and every one returns None,
    the request is refused with 401. With no plugin implementing it, callers are anonymous.
    """


@hookspec
async def access(ctx: RequestContext) -> Reply | None:
    """Admit the request, or answer it, or refuse it.

    Runs after authentication, in chain order. A plugin may edit ``ctx.body``, set
    ``ctx.feature`` or replace ``ctx.route`` (every later plugin sees the new route).
    Raise ``Reject`` to refuse (e.g. 429). Return a ``Reply`` to answer locally (a cache hit):
    no later ``access`` hook runs and nothing is sent upstream.
    """


@hookspec
async def upstream_request(ctx: RequestContext, req: UpstreamRequest) -> None:
    """Last edit of the outgoing provider request (headers, body, URL), in chain order.

    Runs again for each fallback's request (``ctx.route`` is then the fallback): keep what it
    does idempotent per request. A ``Reject`` raised for a fallback skips that fallback.
    """


@hookspec(firstresult=True)
async def send_upstream(ctx: RequestContext, req: UpstreamRequest) -> UpstreamResponse | None:
    """Take over the provider call (coalescing identical requests, batching).

    :return: the first non-None UpstreamResponse is used instead of calling the provider;
    None lets the next plugin, and finally the core's pooled client, send it.
    """


@hookspec
async def response_headers(ctx: RequestContext, headers: dict[str, str]) -> None:
    """The status (``ctx.status``) and headers are known; nothing is sent yet.

    Edit ``headers`` in place to add or remove reply headers. Runs bottom to top.
    """


@hookspec
def response_chunk(ctx: RequestContext, event: StreamEvent) -> None:
    """One SSE event of a streamed reply, in the client's dialect. Synchronous, CPU only.

    Runs per event, bottom to top; edit ``event.data`` in place or set ``event.drop``.
    Only when some plugin implements this hook does the core parse each event.
    """


@hookspec
async def response_body(ctx: RequestContext, body: dict) -> dict | None:  # type: ignore[type-arg]
    """The whole parsed body of a non-streamed successful reply, in the client's dialect.

    :return: a replacement body, or None to keep it (the core re-serialises only on change).
    Runs bottom to top.
    """


@hookspec
async def response_complete(ctx: RequestContext) -> None:
    """The whole reply is known (status, usage final) and its last bytes are not sent yet.

    For what must survive a crash the moment the client has its reply (a usage record): a
    whole reply's body, an error, or a stream's terminal event is written only after this
    hook. Runs for every plugin in the chain, bottom to top, even below a plugin that
    answered locally; not for a stream that failed or was abandoned (``log`` sees those).
    """


@hookspec
async def log(ctx: RequestContext) -> None:
    """After the last byte was sent, or the request failed: record it. Must never block.

    Runs for every plugin in the chain, whatever happened. ``ctx.status``, ``ctx.usage``,
    ``ctx.timings`` and ``ctx.error_code`` are final.
    """


@hookspec
async def forget_user(user_id: str) -> dict[str, int] | None:
    """Delete what this plugin keeps about a user (``DELETE /admin/users/{user}/data``).

    Called once per plugin of the live chain, in chain order, never on the request path.
    Return what was deleted as ``{kind: count}`` (e.g. ``{"usage_rows": 12}``) for the admin
    API's answer; raise if the deletion could not be done, so it is not reported as done.
    """
