"""responses: the state of OpenAI's Responses API, kept per tenant, encrypted, with a TTL.

What ``previous_response_id``, ``GET``/``DELETE /v1/responses/{id}`` and
``GET /v1/responses/{id}/input_items`` need. Every ``/v1/responses`` reply the gateway answers
with ``store`` not false is recorded (``plugins.responses.store``): whose it is (the caller's
user: another user's id is a 404, exactly as an id that never existed), when, which model, and
who keeps the Response object:

* ``native``: an OpenAI provider serving the Responses API made and keeps it; the routes ask
  that provider after checking the owner. The conversation is recorded too
  (``native_content``), so it can continue on a translated model (a fallback, routing's
  ``auto``) without asking the provider.
* ``gateway``: a translated route made it (an Anthropic model, or an OpenAI-compatible provider
  with ``responses: chat``); the gateway keeps the whole conversation that went in and the
  Response, and answers the routes itself.

On a request with ``previous_response_id`` the ``access`` hook checks the owner, then, unless
the serving route is the very provider that keeps the previous response natively (and so are
its fallbacks), expands the stored conversation into ``input`` (earlier turns first) and drops
the id, so the request is self-contained; the reply still names the id it continued. A token
count (``POST /v1/responses/input_tokens``) with ``previous_response_id`` is expanded alike,
so it counts the turn that would follow, and records nothing. This plugin sits after routing (it needs the route that will serve) and before the cache.

Records are written in ``response_complete``, before the reply's last bytes go out: a client
that continues the conversation the moment it has the reply, on this instance or another,
finds the record. Memory: one dict insert and an AES-GCM seal; Redis: one round trip.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import aiohttp
from aiohttp import web
from pydantic import Field

from plugins.responses.conversation import Unavailable, conversation
from plugins.responses.routes import ResponseRoutes
from plugins.responses.store import ResponseStore, StoreUnavailable
from proxy import translate
from proxy.appkeys import METRICS, RESOURCES
from proxy.context import RequestContext, Route, StashKey, StreamEvent
from proxy.errors import Reject
from proxy.hookspecs import endpoints, hookimpl
from proxy.policy import Policy, Seconds
from proxy.responses_api import CONTINUES, REISSUED
from proxy.sealconfig import SealedConfig
from proxy.statewatch import STATE_WATCH, StateWatch, is_state_error
from proxy.upstream import ProviderClient

log = logging.getLogger("tollway.responses")

STORE: StashKey[ResponseStore] = StashKey()


@dataclass(slots=True)
class _Plan:
    """A reply to record: for whom, and the id the provider itself continued (if any)."""

    owner: str
    prev: str | None


_PLAN: StashKey[_Plan] = StashKey()
_FINAL: StashKey[dict[str, Any]] = StashKey()  # the Response object the client got
_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete"})


class ResponsesConfig(SealedConfig):
    key_name: ClassVar[str] = "responses encryption key"
    ttl: Seconds = Field(
        30 * 86400.0,
        gt=0,
        description="How long a stored response can be retrieved or continued (OpenAI keeps "
        "them 30 days); also the retention of the conversations kept.",
    )
    max_bytes: int = Field(
        64 * 2**20, ge=1024, description="Memory store size bound (least recently used out)."
    )
    max_record_bytes: int = Field(
        4 * 2**20,
        ge=1024,
        description="Largest record (a conversation with its reply); a larger one is not "
        "kept, and continuing it is a 404.",
    )
    native_content: bool = Field(
        True,
        description="Also keep the conversation of responses an OpenAI provider keeps itself, "
        "so it can continue on a translated model; false keeps only whose they are.",
    )


def owner_of(ctx: RequestContext) -> str:
    """The tenant a response belongs to: the caller's user (the cache's default scope)."""
    principal = ctx.principal
    return principal.user_id if principal is not None else "anonymous"


def not_found_previous(prev: str) -> Reject:
    return Reject(
        404,
        f"Previous response with id '{prev}' not found.",
        type="invalid_request_error",
        param="previous_response_id",
        code="previous_response_not_found",
    )


def _metrics(store: ResponseStore) -> dict[str, Any]:
    st = store.stats
    records, nbytes, evictions = store.backend.footprint()
    return {
        "tollway_responses_stored": ("counter", "Responses recorded.", st.stored, ()),
        "tollway_responses_oversize": (
            "counter",
            "Responses not recorded: over max_record_bytes.",
            st.oversize,
            (),
        ),
        "tollway_responses_errors": (
            "counter",
            "Store operations that failed (writes are skipped, reads answered 503).",
            st.errors,
            (),
        ),
        "tollway_responses_records": ("gauge", "Records in the memory store.", records, ()),
        "tollway_responses_bytes": ("gauge", "Bytes in the memory store.", nbytes, ()),
        "tollway_responses_evictions": ("counter", "Records evicted (LRU).", evictions, ()),
    }


class ResponsesPlugin:
    """Keeps and answers the Responses API's state; see the module docstring."""

    Config = ResponsesConfig

    def __init__(self, config: ResponsesConfig, policy: Policy) -> None:
        self.config = config
        self.ttl = config.ttl
        self.url = policy.state.url
        self.keys = config.key_ring(shared=policy.state.distributed)
        # the providers that keep responses themselves: the routes ask them for theirs
        self.providers = {
            name: ProviderClient.build(name, p)
            for name, p in policy.providers.items()
            if p.kind == "openai" and p.responses == "native"
        }
        self.store: ResponseStore | None = None
        self.watch: StateWatch | None = None
        self.routes: ResponseRoutes | None = None

    def translated(self, route: Route) -> bool:
        """Whether ``route`` answers the Responses API by translation (the gateway keeps it)."""
        return not route.native_responses

    @hookimpl
    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        resources = app[RESOURCES]
        self.watch = resources.find(STATE_WATCH)
        store = resources.find(STORE)
        if store is None:
            store = ResponseStore(
                url=self.url,
                keys=self.keys,
                max_bytes=self.config.max_bytes,
                max_record_bytes=self.config.max_record_bytes,
            )
            resources.put(STORE, store)
            resources.on_close(store.close)
        elif self.config.key is not None:
            store.set_keys(self.keys)  # a reload may rotate the keys; the records carry over
        store.max_record_bytes = self.config.max_record_bytes
        self.store = store
        app[METRICS].add("responses", lambda: _metrics(store))
        async with aiohttp.ClientSession() as session:  # the routes' calls to providers
            self.routes = ResponseRoutes(store, self._read, session, self.providers)
            try:
                yield
            finally:
                self.routes = None

    @hookimpl
    def register_routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/responses/{response_id}", self._get),
            web.delete("/v1/responses/{response_id}", self._delete),
            web.get("/v1/responses/{response_id}/input_items", self._input_items),
        ]

    def _live(self) -> ResponseRoutes:
        if self.routes is None:
            raise Reject(503, "the gateway is starting or stopping", code="not_ready")
        return self.routes

    async def _get(self, request: web.Request) -> web.StreamResponse:
        return await self._live().get(request)

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        return await self._live().delete(request)

    async def _input_items(self, request: web.Request) -> web.StreamResponse:
        return await self._live().input_items(request)

    # ---- request side ----------------------------------------------------------------------

    async def _read(self, response_id: str, owner: str) -> dict[str, Any] | None:
        """The owner's record, or None; 503 when the store cannot be read."""
        assert self.store is not None
        try:
            return await self.store.get_owned(response_id, owner)
        except StoreUnavailable as e:
            watch = self.watch
            cause = e.__cause__
            if watch is not None and cause is not None and is_state_error(cause):
                watch.failed(cause)
                raise watch.reject() from None
            raise Reject(
                503,
                "stored responses are unreachable; retry shortly",
                code="state_unavailable",
                headers={"Retry-After": "1"},
            ) from None

    def _passes_through(self, record: dict[str, Any], ctx: RequestContext, route: Route) -> bool:
        """Whether the provider that will serve keeps the previous response itself, so the id
        can go to it as it is (every fallback too, or a fallback would lose the thread)."""
        provider = record.get("provider")
        if record.get("kind") != "native" or self.translated(route) or provider != route.provider:
            return False
        if record.get("items") is None:
            return True  # nothing kept to expand from: the provider's thread is all there is
        return all(not self.translated(f) and f.provider == provider for f in ctx.fallbacks)

    @hookimpl
    @endpoints("responses", "input_tokens")  # chat and messages requests never call it
    async def access(self, ctx: RequestContext) -> None:
        if ctx.endpoint != "responses" or self.store is None:
            if ctx.endpoint == "input_tokens" and self.store is not None:
                prev = ctx.body.get("previous_response_id")  # a count of the next turn
                if prev is not None:
                    await self._continue(ctx, owner_of(ctx), prev, echo=False)
            return None
        body = ctx.body
        owner = owner_of(ctx)
        prev = body.get("previous_response_id")
        if prev is not None:
            await self._continue(ctx, owner, prev)
        if body.get("store") is not False:
            passed = ctx.body.get("previous_response_id")
            ctx.stash[_PLAN] = _Plan(owner, passed if isinstance(passed, str) else None)
        return None

    async def _continue(
        self, ctx: RequestContext, owner: str, prev: Any, echo: bool = True
    ) -> None:
        """Expand ``prev``'s conversation into ``input`` (unless it passes through); ``echo``:
        the reply is a Response that names the id it continued (a token count is not)."""
        if not isinstance(prev, str) or not prev:
            raise Reject(
                400,
                "Invalid type for 'previous_response_id': expected a non-empty string.",
                param="previous_response_id",
                code="invalid_type",
            )
        record = await self._read(prev, owner)
        if record is None:
            raise not_found_previous(prev)
        route = ctx.route
        if route is None or self._passes_through(record, ctx, route):
            return  # an unknown model is the core's 404; a native thread stays with its provider
        serving = None if self.translated(route) else route.provider
        try:
            earlier = await conversation(record, partial(self._read, owner=owner), serving)
            new = translate.responses_input_items(ctx.body)
        except Unavailable as e:
            raise Reject(
                e.status, str(e), param="previous_response_id", code="previous_response_unusable"
            ) from None
        except ValueError as e:
            raise Reject(400, f"Invalid 'input': {e}", param="input") from None
        body = dict(ctx.body)
        del body["previous_response_id"]
        body["input"] = [*earlier, *new]
        ctx.body = body
        if echo:
            ctx.stash[CONTINUES] = prev

    # ---- response side ---------------------------------------------------------------------

    @hookimpl
    @endpoints("responses")  # a chat or messages stream is not parsed for this plugin
    def response_chunk(self, ctx: RequestContext, event: StreamEvent) -> None:
        stash = ctx.stash
        if _PLAN not in stash and CONTINUES not in stash:
            return
        data = event.data
        response = data.get("response")
        if not isinstance(response, dict):
            return
        echo = stash.get(CONTINUES)
        if echo is not None and response.get("previous_response_id") is None:
            response["previous_response_id"] = echo
        if data.get("type") in _FINAL_EVENTS and _PLAN in stash:
            stash[_FINAL] = response

    @hookimpl
    @endpoints("responses")
    async def response_body(self, ctx: RequestContext, body: dict[str, Any]) -> Any:
        stash = ctx.stash
        if _PLAN not in stash and CONTINUES not in stash:
            return None
        changed = False
        echo = stash.get(CONTINUES)
        if echo is not None and body.get("previous_response_id") is None:
            body["previous_response_id"] = echo
            changed = True
        if _PLAN in stash and body.get("object") == "response":
            stash[_FINAL] = body
        return body if changed else None

    @hookimpl
    @endpoints("responses")
    async def response_complete(self, ctx: RequestContext) -> None:
        plan = ctx.stash.get(_PLAN)
        store = self.store
        if plan is None or store is None or ctx.status != 200 or ctx.error_code is not None:
            return
        # a reply made for another request (a cache hit, a coalesced follower) went out under
        # an id of this request's own, made by the gateway: the gateway keeps that Response
        reissued = ctx.stash.get(REISSUED)
        response = ctx.stash.get(_FINAL) or reissued
        route = ctx.route
        rid = response.get("id") if response is not None else None
        if response is None or route is None or not isinstance(rid, str) or not rid:
            return
        watch = self.watch
        if watch is not None and not watch.available:
            store.stats.errors += 1  # Redis is down: no write waits on its timeout
            return
        native = not self.translated(route) and reissued is None
        keep = not native or self.config.native_content
        try:
            items = translate.responses_input_items(ctx.body) if keep else None
        except ValueError:
            items = None  # an input the provider took but the normaliser does not know
        record = {
            "v": 1,
            "id": rid,
            "owner": plan.owner,
            "created_at": response.get("created_at"),
            "model": route.model,
            "kind": "native" if native else "gateway",
            "provider": route.provider,
            "prev": plan.prev if native else None,
            "items": items,
            "response": response if items is not None else None,
        }
        await store.put(record, self.ttl)

    # ---- erasure ---------------------------------------------------------------------------

    @hookimpl
    async def forget_user(self, user_id: str) -> dict[str, int]:
        assert self.store is not None
        at_providers = 0
        routes = self.routes
        for record in await self.store.records_of(user_id):
            if record.get("kind") == "native" and routes is not None:
                at_providers += await routes.delete_at_provider(record)
        deleted = await self.store.forget_owner(user_id)
        return {"responses": deleted, "provider_responses": at_providers}
