"""The lifecycle attributes of an issued key, as the admin API and ``tollway keys`` take them.

One place checks what a client of the admin API sends (``POST /admin/keys``,
``PATCH /admin/keys/{id}``) and turns it into ``KeyRecord`` fields, so the API and the CLI's
offline mode (``--state-dir``) accept exactly the same things. Every refusal is a 400 naming
the field. Scopes and the per-key rate are checked against the key's plan: a key can narrow
its plan, never widen it (a model or feature the plan lacks, or more requests per minute than
the plan's, is refused here rather than silently ignored at request time).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from proxy.errors import Reject
from proxy.policy import Policy, parse_duration

FIELDS = ("name", "expires_at", "expires_in", "scopes", "rpm", "labels", "budget_usd")
"""What a create or an update may set, besides ``user`` and ``tier``."""

MAX_NAME = 100
MAX_LABELS = 20
MAX_LABEL_VALUE = 200
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _bad(field: str, message: str) -> Reject:
    return Reject(400, f"'{field}' {message}", code="invalid_request", param=field)


def when(value: float) -> str:
    """A Unix time as ISO-8601 UTC, the form every message about a key's times uses."""
    return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds")


def parse_time(value: Any, field: str = "expires_at") -> float:
    """Unix seconds from a number or an ISO-8601 string (UTC when it names no zone)."""
    if isinstance(value, bool):
        raise _bad(field, "must be a time: Unix seconds or ISO-8601")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise _bad(field, f"must be Unix seconds or ISO-8601, not {value!r}") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        seconds = parsed.timestamp()
    else:
        raise _bad(field, "must be a time: Unix seconds or ISO-8601")
    if not math.isfinite(seconds) or seconds <= 0:
        raise _bad(field, "must be a time after 1970")
    return seconds


def _names(value: Any, field: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _bad(field, "must be a list of names, or null for everything the plan allows")
    return tuple(dict.fromkeys(value))  # order kept, duplicates dropped


def _labels(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad("labels", "must be an object of key: value strings, e.g. {project: web}")
    if len(value) > MAX_LABELS:
        raise _bad("labels", f"may hold at most {MAX_LABELS} labels")
    for k, v in value.items():
        if not _LABEL_KEY.match(k):
            raise _bad(
                "labels",
                f"key {k!r} must be 1-63 letters, digits, '_', '.', '-' or '/', "
                "starting with a letter or digit",
            )
        if not isinstance(v, str) or len(v) > MAX_LABEL_VALUE or _CONTROL.search(v):
            raise _bad(
                "labels",
                f"value of {k!r} must be a string of at most {MAX_LABEL_VALUE} "
                "characters without control characters",
            )
    return dict(value)


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    """``project=web`` arguments (the CLI's ``--label``) as a labels object."""
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise _bad("labels", f"{item!r} is not key=value")
        out[k.strip()] = v.strip()
    return out


def parse(data: dict[str, Any], now: float) -> dict[str, Any]:
    """The lifecycle fields present in ``data`` as ``KeyRecord`` fields (absent ones are
    left out: an update changes only what it names; null clears). Types only; the plan is
    checked by :func:`check_plan` on the record's final values."""
    out: dict[str, Any] = {}
    if "name" in data:
        name = data["name"]
        if name is None:
            name = ""
        if not isinstance(name, str) or len(name) > MAX_NAME or _CONTROL.search(name):
            raise _bad("name", f"must be a string of at most {MAX_NAME} characters")
        out["name"] = name.strip()
    if "expires_at" in data and "expires_in" in data:
        raise _bad("expires_in", "cannot be given with 'expires_at': choose one")
    if "expires_in" in data:
        span = data["expires_in"]
        if span is None:
            out["expires_at"] = None
        else:
            try:
                seconds = parse_duration(span)
            except ValueError as e:
                raise _bad("expires_in", f"must be a duration such as 30d or 12h ({e})") from None
            if seconds <= 0:
                raise _bad("expires_in", "must be longer than 0")
            out["expires_at"] = now + seconds
    elif "expires_at" in data:
        at = data["expires_at"]
        out["expires_at"] = None if at is None else parse_time(at)
        if at is not None and out["expires_at"] <= now:
            raise _bad("expires_at", f"is in the past ({when(out['expires_at'])})")
    if "scopes" in data:
        scopes = data["scopes"]
        if scopes is None:
            scopes = {}
        if not isinstance(scopes, dict) or set(scopes) - {"models", "features"}:
            raise _bad("scopes", "must be an object with 'models' and/or 'features' lists")
        out["models"] = _names(scopes.get("models"), "scopes.models")
        out["features"] = _names(scopes.get("features"), "scopes.features")
    if "rpm" in data:
        rpm = data["rpm"]
        if rpm is not None and (isinstance(rpm, bool) or not isinstance(rpm, int) or rpm < 1):
            raise _bad("rpm", "must be a whole number of requests per minute, at least 1")
        out["rpm"] = rpm
    if "labels" in data:
        out["labels"] = _labels(data["labels"])
    if "budget_usd" in data:
        budget = data["budget_usd"]
        if budget is not None and (
            isinstance(budget, bool)
            or not isinstance(budget, int | float)
            or not math.isfinite(budget)
            or budget < 0
        ):
            raise _bad("budget_usd", "must be a non-negative amount in USD, or null")
        out["budget_usd"] = None if budget is None else float(budget)
    return out


def plan_features(policy: Policy, tier: str) -> frozenset[str]:
    """The features a plan includes (its own and those of the plans it includes); empty
    means every feature, as in the limits plugin."""
    features: set[str] = set()
    seen: set[str] = set()
    cur: str | None = tier
    while cur is not None and cur not in seen and cur in policy.tiers:
        seen.add(cur)
        features.update(policy.tiers[cur].features)
        cur = policy.tiers[cur].includes
    return frozenset(features)


def check_plan(
    policy: Policy,
    tier: str,
    models: tuple[str, ...] | None,
    features: tuple[str, ...] | None,
    rpm: int | None,
    extra_models: Iterable[str] = (),
) -> None:
    """Refuse scopes and a rate wider than the plan's. ``extra_models``: names plugins add
    (``model: auto``)."""
    if tier not in policy.tiers:
        return  # a plan the policy does not declare (none declared): nothing to narrow
    if models is not None:
        allowed = policy.allowed_models(tier)
        known = set(policy.models).union(extra_models)
        for m in models:
            if m not in known:
                raise _bad("scopes.models", f"names unknown model {m!r}")
            if allowed is not None and m not in allowed and m not in extra_models:
                raise _bad("scopes.models", f"model {m!r} is not included in plan {tier!r}")
    if features is not None:
        included = plan_features(policy, tier)
        known_features = set(policy.features).union(*(t.features for t in policy.tiers.values()))
        if policy.default_feature:
            known_features.add(policy.default_feature)
        for f in features:
            if f not in known_features:
                raise _bad("scopes.features", f"names unknown feature {f!r}")
            if included and f not in included:
                raise _bad("scopes.features", f"feature {f!r} is not included in plan {tier!r}")
    plan_rpm = policy.tiers[tier].requests_per_minute
    if rpm is not None and plan_rpm is not None and rpm > plan_rpm:
        raise _bad("rpm", f"{rpm} is more than plan {tier!r} allows ({plan_rpm} per minute)")
