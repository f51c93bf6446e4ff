"""auth: gateway-issued API keys -> the caller's user and tier.

Keys come from the shared key store (created through the admin API or ``tollway keys``) and
from this plugin's config, where a deployment managed as code lists keys by their SHA-256.
Both ``Authorization: Bearer KEY`` (OpenAI SDK) and ``x-api-key: KEY`` (Anthropic SDK) work.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from proxy.appkeys import KEYSTORE
from proxy.context import Principal, RequestContext
from proxy.errors import Reject
from proxy.hookspecs import hookimpl
from proxy.keystore import KeyStore
from proxy.policy import Policy, policy_of

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


class AuthPlugin:
    """Resolve the presented key to a Principal; 401 in the route's shape otherwise."""

    Config = AuthConfig

    def __init__(self, config: AuthConfig, policy: Policy) -> None:
        self.config = config
        self.store: KeyStore | None = None

    @hookimpl
    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        self.store = app[KEYSTORE]
        self.store.set_declared([(k.id, k.user, k.tier, k.sha256) for k in self.config.keys])
        yield

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
        return Principal(user_id=rec.user, key_id=rec.id, tier=rec.tier)
