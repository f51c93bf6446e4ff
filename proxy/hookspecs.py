"""The plugin API: every hook Tollway calls, each docstring its reference.

pluggy declares these hooks, registers plugins and checks them at startup (unknown hook names,
wrong argument names). pluggy is *not* called per request: ``compile_chain`` turns the enabled
plugins into per-phase tuples of bound methods in ``chain:`` order and the handler awaits them
in a plain loop. So the results rules below are Tollway's, applied by the core, not pluggy's.

Order: the request side (``authenticate``, ``access``, ``upstream_request``, ``send_upstream``)
runs top to bottom of ``chain:``; the response side (``response_headers``, ``response_chunk``,
``response_body``) bottom to top. If ``access`` of the plugin at position k returns a Reply, the
response side runs only for plugins above k. ``log`` runs for every plugin, always.

Every hook except ``lifespan``, ``response_chunk`` and the hooks that contribute to the
application or tell about the plugin (``register_routes``, ``model_names``,
``cached_features``, ``data_files``: plain ``def``; ``register_commands``: a
``@staticmethod``) must be ``async def``; a plugin with an implementation of the wrong kind is
refused at startup. An implementation may take fewer arguments than its spec (as pluggy
allows), by name and in any order: the compiled chain passes it just those.

A plugin contributes what the core serves beside the request path through hooks alone, the
way Datasette and llm plugins do: HTTP routes (``register_routes``), ``tollway`` subcommands
(``register_commands``), model names (``model_names``) and dashboard figures
(``dashboard_figures``); what it caches and keeps on disk (``cached_features``,
``data_files``) for the demo's banner. The core never imports a plugin nor probes its attributes, so a
third-party plugin can do all that a built-in does.

Everything a plugin gives the core travels through a hook's arguments or its result, never
through a callable or a mailbox left on the context: the provider call comes as
``send_upstream``'s ``call``, reply headers are set in ``response_headers`` (the one way), and
state a plugin keeps from one phase to a later one goes in ``ctx.stash``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, TypeVar

import pluggy

from proxy.context import ENDPOINTS

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterable, Mapping

    from aiohttp import web

    from proxy.context import (
        Principal,
        Reply,
        RequestContext,
        StreamEvent,
        UpstreamCall,
        UpstreamRequest,
        UpstreamResponse,
    )
    from proxy.figures import Figures

PROJECT = "tollway"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

REQUEST_HOOKS = (
    "access",
    "upstream_request",
    "send_upstream",
    "response_headers",
    "response_chunk",
    "response_body",
    "response_complete",
    "log",
)
"""The hooks called per request once the caller is known: the ones ``endpoints`` can limit.
Not ``authenticate``: a key is valid or not whatever the endpoint (plugin routes check it too)."""

_F = TypeVar("_F", bound="Callable[..., object]")


def endpoints(*names: str) -> Callable[[_F], _F]:
    """Call this request-path hook implementation only for requests to these endpoints.

    ``@hookimpl`` on top, then ``@endpoints("responses", "input_tokens")``. The chain is
    compiled once per endpoint, so on every other endpoint the hook is not in the tuples at all:
    it costs nothing, not even a call that returns at once. That matters for
    ``response_chunk``: the core parses each stream event only when some hook of that
    endpoint's chain implements it. Names are ``proxy.context.Endpoint``'s (``chat``,
    ``completions``, ``embeddings``, ``messages``, ``responses``, ``count_tokens``,
    ``input_tokens``); only the hooks in ``REQUEST_HOOKS`` can be limited (another one marked
    is refused at startup). A hook without this runs for every endpoint.
    """
    unknown = sorted(set(names) - set(ENDPOINTS))
    if not names or unknown:
        raise ValueError(
            f"endpoints() takes names among {', '.join(ENDPOINTS)}; got {', '.join(unknown) or 'none'}"
        )
    chosen = frozenset(names)

    def mark(fn: _F) -> _F:
        fn.tollway_endpoints = chosen  # type: ignore[attr-defined]  # read by compile_chain
        return fn

    return mark


def on_demand(fn: _F) -> _F:
    """Run this ``response_chunk`` only for requests that asked for their stream's events.

    ``@hookimpl`` on top, then ``@on_demand``. Parsing every event of a stream (and writing
    it again) is most of what a hook costs a stream; a plugin that needs the events of some
    requests only (a cache records a stream it may store, not one it bypasses) marks its hook
    and sets ``ctx.parse_events = True`` for those, in ``access``. On a request no plugin
    asked for, with only on-demand hooks in the endpoint's chain, the core relays the events
    as they came, unparsed, and calls no ``response_chunk`` hook. When the core parses the
    events (some plugin asked, or another hook is not on demand), every hook runs, on-demand
    ones too: they check their own ``ctx.stash``. Only ``response_chunk`` can be marked.
    """
    fn.tollway_on_demand = True  # type: ignore[attr-defined]  # read by compile_chain
    return fn


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
async def send_upstream(
    ctx: RequestContext, req: UpstreamRequest, call: UpstreamCall
) -> UpstreamResponse | None:
    """Take over the provider call (coalescing identical requests, batching).

    :param req: this request's provider request, ``upstream_request`` hooks already run.
    :param call: the core's own provider call for this request, ``await call(req)``: the
        pooled session, timeouts, retries, then ``ctx.fallbacks`` (it may replace
        ``ctx.route``; the response's ``route`` names a fallback that answered). Call it with
        this request's ``req`` or one built from it (a merged batch); a plugin that shares one
        call among requests makes it on behalf of the others. It holds this request's context:
        drop it once the request is answered, or it keeps the request alive.
    :return: the first non-None UpstreamResponse is used instead of calling the provider;
        None lets the next plugin, and finally ``call`` itself, send it.
    """


@hookspec
async def response_headers(ctx: RequestContext, headers: dict[str, str]) -> None:
    """The status (``ctx.status``) and headers are known; nothing is sent yet.

    The one way a plugin sets reply headers: edit ``headers`` in place to add, replace or
    remove them. It arrives holding the core's headers (``X-Request-Id``, ``X-Tollway-Model``,
    ``X-Tollway-Cache`` from ``ctx.cache``), the few provider headers relayed, a ``Reply``'s or
    a ``Reject``'s own headers (``Retry-After``), and the edits of the plugins below. A value
    decided earlier (in ``access``: a rate limit's remaining count) is kept in ``ctx.stash``
    until this hook writes it.

    Runs bottom to top; after an ``access`` Reply at position k only for the plugins above k;
    on an error reply for every plugin (a hook that raises there has its edits undone).
    """


@hookspec
def response_chunk(ctx: RequestContext, event: StreamEvent) -> None:
    """One SSE event of a streamed reply, in the client's dialect. Synchronous, CPU only.

    Runs per event, bottom to top; edit ``event.data`` in place or set ``event.drop``.
    Only when some plugin implements this hook for the request's endpoint does the core parse
    each event: a plugin that edits one API's streams says so with ``@endpoints(...)``, and one
    that needs some requests' events only with ``@on_demand`` (then ``ctx.parse_events``).
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


@hookspec
def register_routes() -> Iterable[web.RouteDef] | None:
    """Add HTTP routes to the gateway: return aiohttp route definitions (``web.get(...)``).

    Called once per chain compile (start and each policy reload), never per request; the
    handlers are usually the plugin's bound methods and receive the ``web.Request``. Routes
    are served beside the core's, outside the request chain (no ``authenticate``, limits or
    metering): guard an admin route with ``proxy.admin.admin_only``, which checks the admin key,
    and identify a client route's caller with ``await proxy.routeauth.caller(request)``, which
    runs the chain's ``authenticate`` hooks as the client endpoints do (a Principal, or a 401).
    A ``Reject`` raised by a handler becomes an error body in the caller's dialect, any other
    exception a logged 500 that shows no detail. A route that clashes with the core's or another plugin's is
    refused at load, naming the plugin. Each request runs on the handler of the chain live
    when it arrives, so a reload that changes the plugin's config serves the new instance;
    a route first added by a reload is served after the next restart (aiohttp's router is
    fixed once the server starts; the reload logs it), and one the new chain dropped is a 404.
    """


@hookspec
def register_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add subcommands to the ``tollway`` command line (``subparsers.add_parser(...)``).

    Write it as a ``@staticmethod`` of the plugin's class: the CLI calls it on the class of
    every built-in plugin and every entry point of group ``tollway``, before any policy is
    loaded and whether or not a chain enables the plugin. Give each command a function with
    ``set_defaults(fn=...)``: it receives the parsed ``argparse.Namespace`` and returns the
    exit status. Import what a command needs inside its function, so that ``tollway`` starts
    fast whatever is installed (the metering plugin's ``tollway meter`` loads DuckDB only when
    it runs). A command that runs a server uses the core's ``proxy.cli.runner``, as
    ``tollway serve`` does: ``load_policy(path)`` (exits printing every error of the file),
    ``start_site(app, host, port)`` (exits with one line if it cannot bind) and ``run(coro)``
    (on uvloop when installed). To let the data commands (``sql``, ``invoice``, ``report``,
    ``export``) read from elsewhere than the gateway's admin API, use
    ``proxy.cli.data.add_usage_source`` (metering's ``--db``). The core's other commands (``serve``, ``check``, ``keys``...) are
    parsed without importing any plugin, so a gateway loads only the plugins its chain names.
    """


@hookspec
def model_names() -> Iterable[str] | None:
    """Model names this plugin answers for itself, beside the policy's ``models:``.

    Called once per chain compile, never per request. ``GET /v1/models`` lists them (owned by
    ``tollway``) after the policy's models; a name the policy already lists is not repeated.
    The plugin must also make such a model servable: set ``ctx.route`` in its ``access`` hook
    (routing's ``auto`` picks a model of ``models:``), else the request ends in a 404.
    """


@hookspec
def cached_features() -> Mapping[str, float] | None:
    """Features (request types) whose replies this plugin answers from a cache: ``{feature:
    seconds an answer is kept}``, in the order of the plugin's config.

    Never called per request: ``tollway demo`` asks it to print an example that shows a
    cache hit and to list what is cached (the cache plugin's ``ttl``).
    """


@hookspec
def data_files() -> Mapping[str, str] | None:
    """What this plugin keeps on this machine's disk, and where: ``{what: path}`` (the
    metering plugin's ``{"usage": "data/usage.duckdb"}``).

    Never called per request: ``tollway demo`` prints it beside the keys' file, so a user knows
    what to delete to start from nothing.
    """


@hookspec
async def dashboard_figures() -> Figures | None:
    """What this plugin shows on the dashboard (``GET /dashboard``, ``GET /admin/stats``).

    Called once per plugin of the live chain, in chain order, each time ``/admin/stats`` is
    polled (every five seconds while someone looks at the page), never on the request path.
    Return ``proxy.figures.Figures``: cards (a named value and its format), tables (named
    rows), history charts (``Chart``: a window label such as ``hour`` or ``day``, the
    points' start times and step, one ``Series`` of values per line, None for no data),
    JSON sections added to ``/admin/stats`` as they are, and ``queued`` (requests the
    plugin holds waiting, the autoscaling signal). The page renders what it gets, charts as
    inline SVG, one window at a time; a name already on the page is dropped, and so is a
    chart whose series do not have one value per time (logged). A hook that raises is
    logged and its figures left out; the rest of the answer is unaffected.
    """


@hookspec
async def account_report(principal: Principal, month: str) -> Mapping[str, object] | None:
    """What this plugin tells a key holder about their own account (``GET /v1/tollway/usage``).

    Called once per plugin of the live chain, in chain order, when a client asks for its own
    usage with its gateway key, never on the request path. ``principal`` is the caller (from
    its key: the core never takes a user from the request), ``month`` the current calendar
    month, ``YYYY-MM`` (UTC). Return JSON-able sections by name, merged into the answer
    (``{"quota": {...}}`` from the limits plugin, ``{"usage": ..., "bill": ...}`` from
    metering, ``{"budget": {...}}`` from a budget plugin); a section an earlier plugin gave is
    not replaced. Show only the caller's own data. A hook that raises is logged and its
    sections are null in the answer, so one broken plugin never costs the caller the rest.
    """
