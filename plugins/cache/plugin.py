"""cache: exact-answer cache per tenant, TTL per feature, encrypted at rest.

A request's key (``proxy.fingerprint``) is the tenant scope, endpoint, the model that will
really serve (this plugin sits after routing) and the canonical answer-changing body. A hit is
answered from ``access`` as a ``Reply``: whole, or replayed as a valid stream (``plugins.cache.replay``)
with usage, whichever the client asked for, since one canonical whole body is stored. Only
complete successful replies are stored: a whole body from ``response_body``, or a stream
assembled event by event in ``response_chunk`` and stored in ``log`` only if it finished (a
stream the client abandoned is not). ``Cache-Control: no-cache`` skips the read, ``no-store``
the write. Every reply of a cacheable endpoint carries ``X-Tollway-Cache: hit|miss|bypass``.

With the distributed backend (``backend: state``) a miss that may be stored takes a flight lock in
Redis, so an identical request on another instance waits for this one's stored answer instead
of calling the provider too (``coalesce_instances``); the lock is released in ``log`` whatever
happened, and a waiter whose twin ended without an answer calls the provider itself. The order
is what makes it one call however fast the provider answers: the leader stores the answer, then
releases; claiming re-reads the entry in the same atomic step, so a request whose lookup
missed just before the store finds the answer instead of a free lock; and twins on the
leader's own instance wait for that stored answer in process (the provider call itself may be
long over by the time they arrive, so this instance's coalescing could not share it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Literal

import orjson
from aiohttp import web
from pydantic import Field, field_validator

from plugins.cache.replay import Assembler, replay
from plugins.cache.store import CacheStore
from proxy import responses_api
from proxy.appkeys import METRICS, RESOURCES
from proxy.context import Reply, RequestContext, Route, StashKey, StreamEvent, Usage
from proxy.fingerprint import Scope, fingerprint
from proxy.hookspecs import hookimpl, on_demand
from proxy.policy import Policy, parse_duration
from proxy.sealconfig import SealedConfig
from proxy.statewatch import STATE_WATCH, StateWatch
from proxy.tokens import reply_tokens

log = logging.getLogger("tollway.cache")

STORE: StashKey[CacheStore] = StashKey()
_PLAN: StashKey[tuple[str, float, bool, Route]] = StashKey()  # key, ttl, may store, route
_BODY: StashKey[dict[str, Any]] = StashKey()
_LEADER: StashKey[str] = StashKey()  # the flight lock this request holds (distributed store)
# the attributes of a ``cache.lookup`` phase (shared: phases are only read)
_HIT = {"tollway.cache": "hit"}
_COALESCED = {"tollway.cache": "hit", "tollway.shared": "coalesced"}
_MISS = {"tollway.cache": "miss"}
_ASSEMBLER: StashKey[Assembler] = StashKey()

CACHEABLE = frozenset({"chat", "completions", "messages", "embeddings", "responses"})


class CacheConfig(SealedConfig):
    key_name: ClassVar[str] = "cache encryption key"
    shared_by: ClassVar[str] = "backend"
    ttl: dict[str, float] = Field(
        default_factory=dict,
        description="TTL per feature (request type), e.g. {code_suggestions: 1h}.",
    )
    default_ttl: float | None = Field(
        None, description="TTL of features not listed in ttl; null = those are not cached."
    )
    never: list[str] = Field(default_factory=list, description="Features that are never cached.")
    scope: Scope = Field(
        "user", description="Who may share an answer: user (default), tier, or global."
    )
    max_bytes: int = Field(256 * 2**20, ge=1024, description="Memory backend size bound (LRU).")
    backend: Literal["memory", "state"] = Field(
        "memory", description="memory, or state: the shared store of state.url (Redis)."
    )
    coalesce_instances: bool = Field(
        True,
        description="With backend state: a request whose identical twin is in flight, on "
        "this or another instance, waits for its stored answer instead of calling the provider.",
    )
    flight_timeout: float = Field(
        30.0, gt=0, description="The longest such a wait (then the request calls the provider)."
    )

    @field_validator("ttl", mode="before")
    @classmethod
    def _ttls(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: parse_duration(x) for k, x in v.items()}
        return v

    @field_validator("default_ttl", "flight_timeout", mode="before")
    @classmethod
    def _default(cls, v: Any) -> Any:
        return None if v is None else parse_duration(v)

    def shared(self, policy: Policy) -> bool:
        return self.backend == "state" and policy.state.distributed


def _cache_control(value: str | None) -> tuple[bool, bool]:
    """(no-cache, no-store) from a Cache-Control header."""
    if not value:
        return False, False
    parts = {p.strip().lower() for p in value.split(",")}
    return "no-cache" in parts, "no-store" in parts


def _cache_metrics(store: CacheStore) -> dict[str, Any]:
    st = store.stats
    looked = st.hits + st.misses
    return {
        "tollway_cache_hits": ("counter", "Cache lookups that found an answer.", st.hits, ()),
        "tollway_cache_misses": ("counter", "Cache lookups that found none.", st.misses, ()),
        "tollway_cache_hit_ratio": (
            "gauge",
            "Hits / lookups since start.",
            st.hits / looked if looked else 0.0,
            (),
        ),
        "tollway_cache_entries": ("gauge", "Entries in the memory store.", st.entries, ()),
        "tollway_cache_bytes": ("gauge", "Bytes in the memory store.", st.bytes, ()),
        "tollway_cache_evictions": ("counter", "Entries evicted (LRU).", st.evictions, ()),
        "tollway_cache_decrypt_failures": (
            "counter",
            "Entries that did not decrypt (misses).",
            st.decrypt_failures,
            (),
        ),
        "tollway_cache_errors": ("counter", "Backend errors (treated as misses).", st.errors, ()),
        "tollway_cache_coalesced_instances": (
            "counter",
            "Answers taken from an identical request in flight on another instance.",
            st.coalesced,
            (),
        ),
    }


class CachePlugin:
    """Answers repeats from the encrypted store; see the module docstring."""

    Config = CacheConfig

    def __init__(self, config: CacheConfig, policy: Policy) -> None:
        self.config = config
        self.ttl = dict(config.ttl)
        self.never = frozenset(config.never)
        self.url = policy.state.url if config.backend == "state" else "memory://"
        # without a key, entries live only in this process: a per-process key seals them
        self.keys = config.key_ring(shared=not self.url.startswith("memory://"))
        self.store: CacheStore | None = None
        self.watch: StateWatch | None = None  # Redis's health, with backend: state

    @hookimpl
    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        resources = app[RESOURCES]
        if self.config.backend == "state":
            self.watch = resources.find(STATE_WATCH)
        store = resources.find(STORE)
        if store is None:
            store = CacheStore(url=self.url, max_bytes=self.config.max_bytes, keys=self.keys)
            resources.put(STORE, store)
            resources.on_close(store.close)
        elif self.config.key is not None:
            store.set_keys(self.keys)  # a reload may rotate the keys; the entries carry over
        self.store = store
        app[METRICS].add("cache", lambda: _cache_metrics(store))
        yield

    @hookimpl
    def cached_features(self) -> dict[str, float]:
        # what ``ttl`` names and ``_ttl`` keeps: listed features that are cached at all
        return {f: t for f, t in self.ttl.items() if t and f not in self.never}

    def _ttl(self, feature: str | None) -> float | None:
        if feature in self.never:
            return None
        ttl = self.ttl.get(feature or "", self.config.default_ttl)
        return ttl if ttl else None

    @hookimpl
    async def access(self, ctx: RequestContext) -> Reply | None:
        if ctx.endpoint not in CACHEABLE or ctx.route is None or self.store is None:
            return None
        ttl = self._ttl(ctx.feature)
        watch = self.watch
        if ttl is None or (watch is not None and not watch.available):
            ctx.cache = "bypass"  # while Redis is unreachable: no lookup waits on its timeout
            return None
        no_cache, no_store = _cache_control(ctx.request.headers.get("cache-control"))
        key = fingerprint(ctx, self.config.scope)
        ctx.stash[_PLAN] = (key, ttl, not no_store, ctx.route)
        ctx.cache = "miss"
        if ctx.stream and not no_store:  # a stream it may store: record its events
            ctx.parse_events = True
        if no_cache:
            return None
        looked = time.perf_counter()
        raw, coalesced = await self._lookup(ctx, self.store, key, no_store)
        ctx.timings.phase(
            "cache.lookup",
            looked,
            time.perf_counter(),
            _MISS if raw is None else _COALESCED if coalesced else _HIT,
        )
        if raw is None:
            return None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        ctx.cache = "hit"
        if coalesced:
            ctx.shared = "coalesced"
        if ctx.endpoint == "responses":  # the stored Response's id is its first request's
            body = responses_api.reissue(ctx, body)
        # read by the usage keys, so a stored body of either dialect counts right
        inp, out = reply_tokens(body) or (0, 0)
        ctx.usage = Usage(input_tokens=inp, output_tokens=out, reported=True)
        if ctx.stream:
            opts = ctx.body.get("stream_options")
            wants = isinstance(opts, dict) and bool(opts.get("include_usage"))
            return Reply(events=replay(ctx.endpoint, body, include_usage=wants))
        return Reply(body=body)

    async def _lookup(
        self, ctx: RequestContext, store: CacheStore, key: str, no_store: bool
    ) -> tuple[bytes | None, bool]:
        """The stored answer or None (then ask the provider), and whether it came from another
        request's flight (coalesced): a miss may join or lead a flight across instances."""
        raw = await store.get(key)
        if raw is not None:
            return raw, False
        if not (self.config.coalesce_instances and store.distributed and not no_store):
            return None, False
        claim, raw = await store.claim(key, self.config.flight_timeout)
        if claim == "lead":
            ctx.stash[_LEADER] = key  # released in log, whatever happens
            return None, False
        if claim == "wait":  # None: the flight ended without an answer to share
            return await store.await_flight(key, self.config.flight_timeout), True
        return raw, False

    @hookimpl
    @on_demand  # a bypassed or no-store stream is relayed unparsed
    def response_chunk(self, ctx: RequestContext, event: StreamEvent) -> None:
        plan = ctx.stash.get(_PLAN)
        if plan is None or not plan[2] or ctx.cache != "miss":
            return
        asm = ctx.stash.get(_ASSEMBLER)
        if asm is None:
            n = ctx.body.get("n")
            asm = Assembler(ctx.endpoint, n=n if isinstance(n, int) and n > 0 else 1)
            ctx.stash[_ASSEMBLER] = asm
        asm.feed(event.name, event.data)

    @hookimpl
    async def response_body(self, ctx: RequestContext, body: dict[str, Any]) -> None:
        plan = ctx.stash.get(_PLAN)
        if plan is not None and plan[2] and ctx.cache == "miss" and ctx.status == 200:
            ctx.stash[_BODY] = body
        return None

    @hookimpl
    async def log(self, ctx: RequestContext) -> None:
        leader = ctx.stash.get(_LEADER)
        if leader is None:
            if _PLAN in ctx.stash:  # a bypassed request has no plan: nothing to do
                await self._store_reply(ctx)
            return
        answer = None
        try:
            answer = await self._store_reply(ctx)
        finally:
            # only once the answer is stored: a twin that finds the lock gone finds the answer
            if self.store is not None:
                await self.store.release(leader, answer)

    async def _store_reply(self, ctx: RequestContext) -> bytes | None:
        """Store a complete successful reply; the bytes stored under the key the flight
        lock was taken for (its waiting twins' answer), else None."""
        plan = ctx.stash.get(_PLAN)
        if plan is None or not plan[2] or ctx.cache != "miss" or self.store is None:
            return None
        if ctx.status != 200 or ctx.error_code is not None:
            return None
        body = ctx.stash.get(_BODY)
        if body is None:
            asm = ctx.stash.get(_ASSEMBLER)
            body = asm.result() if asm is not None else None
        if body is None:
            return None
        key, ttl, _, route = plan
        shared = ctx.route is route
        if not shared:  # a fallback answered: file it under the model that did
            key = fingerprint(ctx, self.config.scope)
        # an answer kept for one user is that user's data (forget_user deletes it); an answer
        # shared by a tier or by everyone belongs to no one and expires with its TTL
        principal = ctx.principal
        owner = principal.user_id if principal and self.config.scope == "user" else None
        value = orjson.dumps(body)
        await self.store.set(key, value, ttl, owner)
        return value if shared else None

    @hookimpl
    async def forget_user(self, user_id: str) -> dict[str, int]:
        assert self.store is not None
        return {"cache_entries": await self.store.forget_owner(user_id)}
