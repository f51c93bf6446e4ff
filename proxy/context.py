"""The shared vocabulary of a request: RequestContext and its small value types.

Every plugin reads and writes the same slotted objects, so the hot path never builds dicts of
strings to pass state around. Private per-plugin state goes in ``ctx.stash`` under a typed
``StashKey`` (the pattern pytest uses), so two plugins can never collide on a string key.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, get_args

if TYPE_CHECKING:
    from aiohttp import web

T = TypeVar("T")

Dialect = Literal["openai", "anthropic"]
"""Which provider API shape a client speaks or a provider serves."""

Endpoint = Literal[
    "chat", "completions", "embeddings", "messages", "responses", "count_tokens", "input_tokens"
]
ENDPOINTS: tuple[Endpoint, ...] = get_args(Endpoint)
"""Every endpoint, for what is compiled once per endpoint (``proxy.chain.Chain.for_endpoint``)."""

UNBILLED_ENDPOINTS: frozenset[str] = frozenset({"count_tokens", "input_tokens"})
"""Endpoints whose requests cost nothing at the provider and are not sold (the token counts:
Anthropic's ``count_tokens``, the Responses API's ``input_tokens``): no monthly quota,
no tokens-per-minute charge, a usage row with ``cost_usd`` and ``price_usd`` 0 (metered as
zero-price calls); the request-rate limits still count them."""

STREAM_BROKEN = "upstream_stream_error"
"""``ctx.error_code`` of a stream that failed after its 200 headers went out: the provider's
connection broke or timed out, it sent an error event or a malformed one, or it ended without
its terminal event. ``ctx.status`` is then the failure's status (502, or 504 for a timeout),
not the 200 the client saw first, so usage rows, limits and metrics count it as failed."""


class StashKey(Generic[T]):
    """A typed key for ``Stash``; create one per plugin at module level."""

    __slots__ = ()


class Stash(dict):  # type: ignore[type-arg]
    """Typed per-request private state for plugins (no string keys, no collisions).

    A plain dict underneath, so ``get``, ``[]`` and ``in`` run in C: several plugins touch the
    stash on every request. The typed signatures below exist for the type checker only.
    """

    __slots__ = ()

    if TYPE_CHECKING:

        def __setitem__(self, key: StashKey[T], value: T) -> None: ...

        def __getitem__(self, key: StashKey[T]) -> T: ...

        def get(self, key: StashKey[T], default: T | None = None) -> T | None: ...  # type: ignore[override]

        def __contains__(self, key: object) -> bool: ...


@dataclass(slots=True)
class Principal:
    """Who is calling: the user a gateway key belongs to and that user's tier (their plan)."""

    user_id: str
    key_id: str | None = None
    tier: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class Route:
    """Where a request goes: the policy's model name resolved to a provider and its model.

    ``model`` is the name clients use (and ``X-Tollway-Model`` reports); ``upstream_model`` is
    what the provider is asked for. Prices are USD per million tokens; ``None`` means unknown.
    ``native_responses``: the provider serves the OpenAI Responses API itself (an OpenAI
    provider with ``responses: native``), so ``/v1/responses`` passes through; otherwise it is
    translated through chat completions (and, for Anthropic, messages).
    """

    model: str
    provider: str
    upstream_model: str
    kind: Dialect
    input_per_mtok: float | None = None
    output_per_mtok: float | None = None
    native_responses: bool = False


@dataclass(slots=True)
class Usage:
    """Tokens the provider reported for this request (streams included)."""

    input_tokens: int = 0
    output_tokens: int = 0
    reported: bool = False
    final: bool = False  # the provider's closing count arrived (not a start-of-stream figure)
    events: int = 0  # stream events relayed (the basis of an abandoned stream's estimate)


@dataclass(slots=True)
class Reply:
    """A local answer: returned by an ``access`` hook (a cache hit) or built from a Reject.

    ``body`` is a JSON-able object (serialised once) or raw bytes. ``events`` replays a stream:
    each item is a ready SSE frame (``b"data: ...\\n\\n"``); when set, the reply is streamed.
    """

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    events: list[bytes] | None = None


@dataclass(slots=True)
class StreamEvent:
    """One server-sent event of a provider stream, in the client's dialect.

    ``response_chunk`` hooks may edit ``data`` in place or set ``drop`` to withhold the event.
    """

    name: str | None
    data: dict[str, Any]
    drop: bool = False


Phase = tuple[str, float, float, dict[str, Any] | None]
"""A timed phase of a request: (name, start, end, attributes); see ``Timings.phase``."""


@dataclass(slots=True)
class Timings:
    """Monotonic timestamps (``time.perf_counter``) of the request's milestones.

    ``phases``: the timed steps plugins and the core recorded with ``phase`` (a queue wait, a
    cache lookup, a provider try that was retried), in the order they ended; None until the
    first, so a request without any allocates nothing.
    """

    start: float = 0.0
    first_byte: float = 0.0
    end: float = 0.0
    phases: list[Phase] | None = None

    def phase(
        self, name: str, start: float, end: float, attrs: dict[str, Any] | None = None
    ) -> None:
        """Record that this request spent ``start``..``end`` (``perf_counter``) in ``name``.

        Only a tuple is appended: recording costs nothing measurable, so any plugin may time
        what it waits for without a hook of its own; readers (the otel plugin turns each into
        a child span) do the work after the reply. ``name`` is dotted, owner first
        (``cache.lookup``); ``attrs`` values are str, bool, int or float (or lists of one).
        """
        if self.phases is None:
            self.phases = [(name, start, end, attrs)]
        else:
            self.phases.append((name, start, end, attrs))

    def latency_ms(self) -> float:
        end = self.end or time.perf_counter()
        return (end - self.start) * 1000.0

    def ttfb_ms(self) -> float | None:
        if not self.first_byte:
            return None
        return (self.first_byte - self.start) * 1000.0


@dataclass(slots=True)
class UpstreamRequest:
    """The outgoing provider call; ``upstream_request`` hooks may edit it before it is sent.

    ``body`` is already in the provider's dialect. ``provider`` names the policy provider.
    """

    method: str
    url: str
    headers: dict[str, str]
    body: dict[str, Any]
    provider: str
    kind: Dialect
    stream: bool


@dataclass(slots=True)
class UpstreamResponse:
    """What came back from a provider (or from a plugin that took over the call).

    Exactly one of ``body`` (the whole non-streamed body) and ``chunks`` (raw SSE bytes as they
    arrive) is set. ``release`` frees the connection; the core always calls it.
    """

    status: int
    headers: dict[str, str]
    body: bytes | None = None
    chunks: AsyncIterator[bytes] | None = None
    release: Callable[[], None] | None = None
    route: Route | None = None  # set when a fallback served the call: the route that answered


UpstreamCall = Callable[[UpstreamRequest], Awaitable[UpstreamResponse]]
"""The core's provider call for one request, handed to ``send_upstream`` hooks as ``call``.

An argument rather than an attribute of the context: a callable bound to the request and kept
on it would close a reference cycle (context -> call -> context), and a cycle leaves every
request's objects to the cyclic collector (``tests/proxy/test_cycles.py``)."""


@dataclass(slots=True, weakref_slot=True)
class RequestContext:
    """Everything known about one request, shared by every phase and plugin.

    The core fills the request fields before ``authenticate``; plugins fill what they own
    (``principal``, ``feature``, ``route`` changes, ``fallbacks``: routes to try in order when the
    provider of ``route`` fails, ``cache``, ``shared``: "coalesced" when the reply came from
    another request's provider call, "batched" when the call was shared); the
    core fills ``usage``, ``status``, ``timings`` and ``upstream_request_id`` (the provider's id
    of the call that answered, for support tickets) as the reply goes out, so ``log`` hooks see
    the whole story. After a fallback, ``route`` is the route that answered.

    It holds facts, not channels: reply headers are set in the ``response_headers`` hook (a
    value decided earlier waits in ``stash``), and the provider call reaches ``send_upstream``
    as its ``call`` argument. The core derives its own headers from the facts: ``request_id``,
    ``route`` (``X-Tollway-Model``) and ``cache`` (``X-Tollway-Cache``).
    """

    request_id: str
    endpoint: Endpoint
    dialect: Dialect
    request: web.Request
    client_ip: str
    body: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    parse_events: bool = False
    """Set by a plugin (in ``access``) whose ``response_chunk`` is ``@on_demand`` and needs
    this request's stream events: only then are they parsed for such hooks."""
    model: str = ""
    principal: Principal | None = None
    feature: str | None = None
    route: Route | None = None
    fallbacks: tuple[Route, ...] = ()
    usage: Usage = field(default_factory=Usage)
    cache: str | None = None
    status: int = 0
    error_code: str | None = None
    error_message: str | None = None
    retries: int = 0
    timings: Timings = field(default_factory=Timings)
    shared: str | None = None
    upstream_request_id: str | None = None
    finish_reasons: tuple[str, ...] = ()
    """Why a streamed reply stopped, one reason per choice, in the provider's words
    (``stop``, ``length``, ``end_turn``...); with ``response_model`` and ``response_id`` (the
    model and id its events name), read by the core from the few events it parses anyway.
    A whole reply's are in its body (``response_body``)."""
    response_model: str | None = None
    response_id: str | None = None
    stash: Stash = field(default_factory=Stash)
