"""The model catalogue clients see: ``GET /v1/models`` and ``GET /v1/models/{model_id}``.

Both answer in the shape of the SDK that asks: Anthropic's (it sends ``anthropic-version``)
or OpenAI's. A caller sees the models its plan may use (``Policy.allowed_models``: the tier's
``models`` list, less the ``custom`` models unless the tier has the custom_models perk), then
the names plugins answer for themselves (``model_names``: routing's ``auto``). A model the plan
may not use is a 404 like an unknown one: the catalogue does not tell one plan's customers
what the others get. A key whose plan the policy does not define sees no model (its requests
are refused anyway).

The policy knows a model's name and provider, not what a provider's catalogue knows (release
date, context window, capabilities), and a model served through the gateway may be translated
to the other dialect, so a provider's capability list would not hold either. The Anthropic
fields for those are what the SDK documents for "unknown": ``created_at`` at the epoch,
``null`` for the optional ones; ``lifecycle`` is ``active``, as the gateway serves every model
it lists. OpenAI's ``created`` is the epoch too, and ``shutdown_date`` null (none announced).

Not on the hot path: one listing walks the policy's models (a few dozen at most).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from multidict import MultiMapping

from proxy.appkeys import GATEWAY
from proxy.context import Dialect, Principal, RequestContext
from proxy.errors import Reject, reject_body
from proxy.handler import authenticate, new_request_id, request_dialect
from proxy.runtime import Runtime

EPOCH = "1970-01-01T00:00:00Z"
"""``created_at`` of every model: the policy does not know release dates (the SDK's
documented value for an unknown one)."""
LIFECYCLES = frozenset({"active", "deprecated", "retired"})
PAGE_DEFAULT, PAGE_MAX = 20, 1000
"""Anthropic's list page size: 20 unless ``limit`` (1 to 1000) says otherwise."""


def openai_model(name: str, owner: str) -> dict[str, Any]:
    """One model in OpenAI's shape (``Model``): ``owned_by`` is the serving provider's name
    in the policy, ``tollway`` for a name a plugin answers for; no shutdown is announced."""
    return {"id": name, "object": "model", "created": 0, "owned_by": owner, "shutdown_date": None}


def anthropic_model(name: str) -> dict[str, Any]:
    """One model in Anthropic's shape (``ModelInfo``), every field the SDK declares."""
    return {
        "type": "model",
        "id": name,
        "display_name": name,
        "created_at": EPOCH,
        "lifecycle": "active",
        "deprecated_at": None,
        "retires_at": None,
        "line": None,  # the SDK: never inferred from the id
        "max_input_tokens": None,
        "max_tokens": None,
        "capabilities": None,
    }


def visible_models(rt: Runtime, principal: Principal | None) -> dict[str, str]:
    """The models ``principal`` may use, in listing order: name -> owner."""
    policy = rt.loaded.policy
    tier = principal.tier if principal is not None else None
    allowed: frozenset[str] | None = None
    if tier is not None and policy.tiers:
        if tier not in policy.tiers:
            return {}
        allowed = policy.allowed_models(tier)
    out = {n: r.provider for n, r in rt.routes.items() if allowed is None or n in allowed}
    for extra in rt.chain.model_names:  # names plugins answer for themselves (routing's "auto")
        out.setdefault(extra, "tollway")
    return out


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


def _error(exc: Reject, dialect: Dialect) -> web.Response:
    return web.Response(
        status=exc.status, body=reject_body(exc, dialect), content_type="application/json"
    )


async def _caller(request: web.Request, dialect: Dialect) -> tuple[Runtime, Principal | None]:
    """The live runtime and the authenticated caller (None without auth plugins); a Reject
    (401) when the key is missing or unknown."""
    rt = request.app[GATEWAY].runtime
    if not rt.chain.authenticate:
        return rt, None
    ctx = RequestContext(
        request_id=new_request_id(),
        endpoint="chat",
        dialect=dialect,
        request=request,
        client_ip=request.remote or "",
    )
    return rt, await authenticate(rt, ctx)


def _lifecycles(query: MultiMapping[str]) -> set[str] | None:
    """Anthropic's ``lifecycle`` filter (repeated, ``[]``-suffixed or comma-separated)."""
    values = [
        v.strip()
        for key in ("lifecycle", "lifecycle[]")
        for raw in query.getall(key, ())
        for v in raw.split(",")
        if v.strip()
    ]
    if not values:
        return None
    unknown = sorted(set(values) - LIFECYCLES)
    if unknown:
        raise Reject(
            400,
            f"lifecycle: {unknown[0]!r} is not one of active, deprecated, retired",
            param="lifecycle",
        )
    return set(values)


def anthropic_page(names: list[str], query: MultiMapping[str]) -> dict[str, Any]:
    """One page of Anthropic's list: ``limit``, and ``after_id`` or ``before_id`` as cursor."""
    raw = query.get("limit")
    try:
        limit = PAGE_DEFAULT if raw is None else int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= PAGE_MAX:
        raise Reject(400, f"limit: must be an integer from 1 to {PAGE_MAX}", param="limit")
    after, before = query.get("after_id"), query.get("before_id")
    if after is not None and before is not None:
        raise Reject(400, "after_id and before_id cannot be given together", param="after_id")
    stages = _lifecycles(query)
    if stages is not None and "active" not in stages:
        names = []  # every model the gateway lists is active
    for cursor, param in ((after, "after_id"), (before, "before_id")):
        if cursor is not None and cursor not in names:
            raise Reject(400, f"{param}: no model {cursor!r} in this list", param=param)
    if before is not None:
        end = names.index(before)
        start = max(0, end - limit)
        page, more = names[start:end], start > 0
    else:
        start = names.index(after) + 1 if after is not None else 0
        page, more = names[start : start + limit], start + limit < len(names)
    return {
        "data": [anthropic_model(n) for n in page],
        "has_more": more,
        "first_id": page[0] if page else None,
        "last_id": page[-1] if page else None,
    }


async def list_models(request: web.Request) -> web.Response:
    """The models the caller may use: OpenAI's list, or Anthropic's paginated one."""
    dialect = request_dialect(request)
    try:
        rt, principal = await _caller(request, dialect)
        models = visible_models(rt, principal)
        if dialect == "anthropic":
            return _json(anthropic_page(list(models), request.query))
    except Reject as e:
        return _error(e, dialect)
    data = [openai_model(n, owner) for n, owner in models.items()]
    return _json({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    """One model the caller may use; a 404 in the caller's shape for any other name."""
    dialect = request_dialect(request)
    name = request.match_info["model_id"]
    try:
        rt, principal = await _caller(request, dialect)
        owner = visible_models(rt, principal).get(name)
        if owner is None:
            raise Reject(
                404,
                f"The model `{name}` does not exist or you do not have access to it.",
                code="model_not_found",
                param="model",
            )
    except Reject as e:
        return _error(e, dialect)
    return _json(anthropic_model(name) if dialect == "anthropic" else openai_model(name, owner))
