"""auth: gateway-issued API keys -> the caller's user and tier.

Keys come from the shared key store (created through the admin API or ``tollway keys``) and
from this plugin's config, where a deployment managed as code lists keys by their SHA-256.
Both ``Authorization: Bearer KEY`` (OpenAI SDK) and ``x-api-key: KEY`` (Anthropic SDK) work.

An issued key's lifecycle is enforced here: an expired key, or an old secret whose grace
period after a rotation ended, is refused with 401 ``key_expired`` naming when; a feature or
model outside the key's scopes with 403 ``key_scope`` naming which. The key's attributes go to
the other plugins in ``Principal.attrs`` (``labels`` for usage rows, ``rpm`` for the limits
plugin's per-key layer, ``budget_usd`` for budgets). The feature is checked in
``authenticate`` (it comes from a header); the model once the body is read, in ``access``
(the model asked for), and again in ``upstream_request`` (the model that will serve, after a
routing plugin's choice). A key without scopes costs one attribute test per request.

A background task looks at every key's expiry once per ``expiry_check`` and emits
``key.expiring`` (7 days and 1 day before) and ``key.expired`` on the event bus
(``proxy.events``), each with a ``dedupe`` that every instance computes alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from proxy.appkeys import KEYSTORE, RESOURCES
from proxy.context import Principal, RequestContext, UpstreamRequest
from proxy.errors import Reject
from proxy.events import EVENTS, Event, EventBus
from proxy.hookspecs import hookimpl
from proxy.keyspec import when
from proxy.keystore import KeyRecord, KeyStore
from proxy.policy import Policy, Seconds, policy_of

log = logging.getLogger("tollway")

EXPIRING_DAYS = (7, 1)
"""Days before a key's expiry at which ``key.expiring`` is emitted (the nearest that applies)."""
EXPIRED_LOOKBACK = 7 * 86400.0
"""A key that expired longer ago than this is not announced again (after a long outage)."""

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class DeclaredKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(description="A stable id for the key (shown in usage rows).")
    user: str = Field(description="The user the key belongs to.")
    tier: str = Field(description="The user's tier: a key of tiers:.")
    sha256: str = Field(pattern=_SHA256.pattern, description="SHA-256 hex of the key.")

    @field_validator("tier")
    @classmethod
    def _known_tier(cls, v: str, info: ValidationInfo) -> str:
        policy = policy_of(info)
        if policy is not None and policy.tiers and v not in policy.tiers:
            raise ValueError(f"unknown tier {v!r}")
        return v


class AuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    keys: list[DeclaredKey] = Field(
        default_factory=list, description="Keys managed as code, by hash (never the secret)."
    )
    expiry_check: Seconds = Field(
        60.0,
        gt=0,
        description="How often every key's expiry is looked at, to emit key.expiring "
        "(7 days and 1 day before) and key.expired events.",
    )


def _scope_refusal(what: str, name: str | None, allowed: tuple[str, ...], param: str) -> Reject:
    return Reject(
        403,
        f"{what} {name!r} is outside this API key's scopes (it may use: {', '.join(allowed)})",
        code="key_scope",
        param=param,
    )


def expiry_events(recs: list[KeyRecord], now: float) -> list[Event]:
    """The key events due at ``now``: for each key with an expiry, ``key.expired`` once it
    passed (within ``EXPIRED_LOOKBACK``), else ``key.expiring`` at the nearest of
    ``EXPIRING_DAYS`` it is within. ``subject`` is the key's user."""
    out = []
    for rec in recs:
        at = rec.expires_at
        if at is None or rec.retired:
            continue
        data: dict[str, Any] = {
            "key_id": rec.id,
            "name": rec.name,
            "user": rec.user,
            "expires_at": at,
            "expires": when(at),
        }
        if at <= now:
            if now - at <= EXPIRED_LOOKBACK:
                out.append(Event("key.expired", rec.user, f"key.expired:{rec.id}:{at:.0f}", data))
            continue
        due = [d for d in EXPIRING_DAYS if at - now <= d * 86400.0]
        if due:
            days = min(due)
            dedupe = f"key.expiring:{rec.id}:{at:.0f}:{days}"
            out.append(Event("key.expiring", rec.user, dedupe, {**data, "days": days}))
    return out


class AuthPlugin:
    """Resolve the presented key to a Principal; 401 in the route's shape otherwise."""

    Config = AuthConfig

    def __init__(self, config: AuthConfig, policy: Policy) -> None:
        self.config = config
        self.store: KeyStore | None = None
        self.events: EventBus | None = None
        self._emitted: set[str] = set()  # dedupes this process emitted (subscribers dedupe too)

    @hookimpl
    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        self.store = app[KEYSTORE]
        self.store.set_declared([(k.id, k.user, k.tier, k.sha256) for k in self.config.keys])
        self.events = app[RESOURCES].get(EVENTS, EventBus)
        task = asyncio.get_running_loop().create_task(self._watch_expiry())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def check_expiry(self, now: float | None = None) -> list[Event]:
        """Emit the key events due now that this process has not emitted yet."""
        if self.store is None or self.events is None:
            return []
        due = expiry_events(self.store.list(), time.time() if now is None else now)
        fresh = [e for e in due if e.dedupe not in self._emitted]
        for event in fresh:
            self._emitted.add(event.dedupe)
            self.events.emit(event)
        return fresh

    async def _watch_expiry(self) -> None:
        while True:
            try:
                self.check_expiry()
            except Exception:
                log.exception("the key expiry check failed")
            await asyncio.sleep(self.config.expiry_check)

    @hookimpl
    async def authenticate(self, ctx: RequestContext) -> Principal | None:
        headers = ctx.request.headers
        key = None
        auth = headers.get("authorization")
        if auth is not None:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "bearer":
                key = value.strip()
        if not key:
            key = headers.get("x-api-key", "").strip()
        if not key:
            raise Reject(
                401,
                "No API key provided. Send 'Authorization: Bearer KEY' or 'x-api-key: KEY'.",
                code="missing_api_key",
            )
        # a key that is not UTF-8 (lone surrogates: aiohttp decodes headers with
        # surrogateescape) cannot be hashed, and no key was issued or declared with such bytes
        valid = key.isascii() or _utf8(key)
        rec = self.store.lookup(key) if self.store is not None and valid else None
        if rec is None:
            raise Reject(401, "Incorrect API key provided.", code="invalid_api_key")
        if rec.grace_until is not None:  # a secret replaced by a rotation
            now = time.time()
            if now >= rec.grace_until:
                raise Reject(
                    401,
                    "This API key was replaced by a new one (rotation); it stopped working "
                    f"at {when(rec.grace_until)}. Use the new key.",
                    code="key_expired",
                )
            assert self.store is not None
            rec = self.store.get(rec.id) or rec  # the key's current attributes
        if rec.expires_at is not None and time.time() >= rec.expires_at:
            raise Reject(
                401, f"This API key expired at {when(rec.expires_at)}.", code="key_expired"
            )
        features = rec.features
        if features is not None and ctx.feature not in features:
            raise _scope_refusal("feature", ctx.feature, features, "X-Tollway-Feature")
        attrs = rec.attrs
        if attrs:
            return Principal(rec.user, rec.id, rec.tier, dict(attrs))
        return Principal(user_id=rec.user, key_id=rec.id, tier=rec.tier)

    @hookimpl
    async def access(self, ctx: RequestContext) -> None:
        principal = ctx.principal
        if principal is not None and principal.attrs:
            scopes = principal.attrs.get("scopes")
            if scopes is not None:
                models = scopes["models"]
                # a name no route has (``auto``) is judged by the model it is routed to
                if models is not None and ctx.model not in models and ctx.route is not None:
                    raise _scope_refusal("model", ctx.model, tuple(models), "model")

    @hookimpl
    async def upstream_request(self, ctx: RequestContext, req: UpstreamRequest) -> None:
        principal = ctx.principal
        if principal is not None and principal.attrs and ctx.route is not None:
            scopes = principal.attrs.get("scopes")
            if scopes is not None:
                models = scopes["models"]
                # a key scoped to a name a plugin resolves (``auto``) may use what it picks
                if models is not None and ctx.route.model not in models and ctx.model not in models:
                    raise _scope_refusal("model", ctx.route.model, tuple(models), "model")
