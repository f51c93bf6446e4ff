"""The webhooks plugin's policy config: where events go, how they are signed and retried."""

from __future__ import annotations

import fnmatch
import hashlib
import re
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from proxy.policy import Seconds

KNOWN_KINDS = (
    "budget.threshold",
    "budget.exceeded",
    "quota.threshold",
    "key.expiring",
    "key.expired",
)
"""The event kinds Tollway's own plugins emit; a pattern must match one of them or name a
kind of its own (``vendor.something``), so a typo such as ``quota.treshold`` is an error."""

_KIND = re.compile(r"^[a-z0-9_*?]+(\.[a-z0-9_*?]+)*$")


class Endpoint(BaseModel):
    """One receiver of events."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    url: str = Field(description="Where events are POSTed (http:// or https://).")
    secret: SecretStr = Field(
        description="Key of the HMAC-SHA256 signature in Tollway-Signature; write it as "
        "{$env: NAME} or {$file: path}."
    )
    kinds: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Event kinds this endpoint receives; shell-style patterns such as "
        "budget.* or quota.threshold.",
    )
    timeout: Seconds = Field(
        10.0, gt=0, description="Longest wait for the receiver's answer to one attempt."
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{v!r} is not an http:// or https:// URL")
        return v

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one kind (or '*')")
        for pattern in v:
            if not _KIND.match(pattern):
                raise ValueError(f"{pattern!r} is not an event kind such as quota.threshold")
            known = any(fnmatch.fnmatchcase(k, pattern) for k in KNOWN_KINDS)
            if not known and pattern.split(".", 1)[0] in {k.split(".")[0] for k in KNOWN_KINDS}:
                raise ValueError(
                    f"{pattern!r} matches no event kind (known: {', '.join(KNOWN_KINDS)})"
                )
        return v

    @property
    def key(self) -> str:
        """The endpoint's stable name in the queue file and in Redis: its URL's digest, so a
        reordered list or a rotated secret keeps what is queued for it."""
        return "ep_" + hashlib.sha256(self.url.encode()).hexdigest()[:16]

    @property
    def shown(self) -> str:
        """The URL without its query and credentials (which may carry a token): for logs and
        ``/admin/stats``."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{parts.path}"

    def wants(self, kind: str) -> bool:
        return any(fnmatch.fnmatchcase(kind, p) for p in self.kinds)


class Backoff(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    initial: Seconds = Field(
        1.0, gt=0, description="Wait before the second attempt; doubled after each failure."
    )
    max: Seconds = Field(600.0, gt=0, description="Longest wait between two attempts.")


class WebhooksConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    endpoints: list[Endpoint] = Field(
        default_factory=list, description="Receivers: url, secret, kinds, timeout."
    )
    max_attempts: int = Field(
        10, ge=1, le=100, description="Attempts per event and endpoint before it is given up."
    )
    backoff: Backoff = Field(
        default_factory=Backoff,
        description="Waits between attempts (each drawn between half and all of the doubled "
        "wait: jitter); a 429 or 503 with Retry-After waits that long instead.",
    )
    concurrency: int = Field(
        4, ge=1, le=64, description="Deliveries in flight at once, over all endpoints."
    )
    queue_file: str | None = Field(
        "webhooks.jsonl",
        description="Append-only file under state.dir holding undelivered events and the "
        "ids already delivered (null, or no state.dir: memory only).",
    )
    keep_delivered: Seconds = Field(
        62 * 86400.0,
        gt=0,
        description="How long an event's id is remembered as delivered (an event noticed "
        "again within it is not sent again).",
    )

    lease: Seconds = Field(
        30.0,
        ge=1,
        description="With state.url: how long a delivery owed by one instance stays with it "
        "without being renewed (every third of it) before a live instance takes it over "
        "(the holder died).",
    )

    @field_validator("endpoints")
    @classmethod
    def _unique(cls, v: list[Endpoint]) -> list[Endpoint]:
        urls = [e.url for e in v]
        dup = next((u for u in urls if urls.count(u) > 1), None)
        if dup is not None:
            raise ValueError(f"endpoint {dup!r} is listed twice")
        return v
