"""The identity of a request's answer: what the cache and request coalescing key on.

Two requests get the same answer when they go to the same endpoint and model with the same
fields that change the answer (messages, tools, temperature, max_tokens, response_format, ...).
Fields that only change the delivery or the bookkeeping (``stream``, ``stream_options``,
``user``, ``metadata``) are left out, so a streamed and a whole request share one answer. The
tenant scope comes first, so by default one user's answer is never another's.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import orjson

from proxy.context import RequestContext, StashKey

Scope = Literal["user", "tier", "global"]

IGNORED_FIELDS = frozenset({"model", "stream", "stream_options", "user", "metadata", "store"})


def scope_id(ctx: RequestContext, scope: Scope) -> str:
    """The tenant part of the key: the user (default), the tier, or everyone."""
    principal = ctx.principal
    if scope == "global":
        return "global"
    if scope == "tier":
        return f"tier:{principal.tier if principal else '-'}"
    return f"user:{principal.user_id if principal else '-'}"


_MEMO: StashKey[tuple[str, str, str]] = StashKey()
_CANON: StashKey[tuple[str, str, bytes]] = StashKey()


def canonical(ctx: RequestContext, scope: Scope) -> bytes:
    """The bytes ``fingerprint`` hashes: the scope, endpoint, serving model and the
    answer-changing body as sorted-key JSON. Two requests share an answer exactly when these
    are equal, so a key that stays in this process (request coalescing) is these bytes
    themselves: no SHA-256 and no hex per request. Computed once per request and scope."""
    model = ctx.route.model if ctx.route is not None else ctx.model
    memo = ctx.stash.get(_CANON)
    if memo is not None and memo[0] == scope and memo[1] == model:
        return memo[2]
    body: dict[str, Any] = ctx.body
    canon = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    blob = orjson.dumps(
        [scope_id(ctx, scope), ctx.endpoint, model, canon], option=orjson.OPT_SORT_KEYS
    )
    ctx.stash[_CANON] = (scope, model, blob)
    return blob


def fingerprint(ctx: RequestContext, scope: Scope) -> str:
    """SHA-256 over ``canonical``: a fixed-size key for a store shared beyond this process
    and this request's lifetime (the cache's entries, its flight locks in Redis).

    Computed once per request and scope.
    """
    model = ctx.route.model if ctx.route is not None else ctx.model
    memo = ctx.stash.get(_MEMO)
    if memo is not None and memo[0] == scope and memo[1] == model:
        return memo[2]
    digest = hashlib.sha256(canonical(ctx, scope)).hexdigest()
    ctx.stash[_MEMO] = (scope, model, digest)
    return digest
