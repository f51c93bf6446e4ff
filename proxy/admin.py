"""The admin API: keys and policy reload, behind the admin key.

Every route compares the bearer token with ``admin.key`` in constant time; without an admin
key in the policy the admin API is disabled (403), never open.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from proxy import dashboard, keyspec
from proxy.analytics import (
    ANALYTICS,
    FRESH_AS_OF,
    AnalyticsBackend,
    InvalidExportPath,
    QueryBusy,
    QueryError,
    QueryTimeout,
    ReadOnlyQuery,
    ResultTooLarge,
    ShuttingDown,
    invoice_csv,
    json_default,
)
from proxy.appkeys import GATEWAY, RESOURCES
from proxy.errors import Reject, reject_body
from proxy.keystore import KeyRecord
from proxy.policy import PolicyError, parse_duration
from proxy.statewatch import is_state_error

_MONTH = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")

log = logging.getLogger("tollway")

AdminHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(exc: Reject) -> web.Response:
    return web.Response(
        status=exc.status,
        body=reject_body(exc, "openai"),
        content_type="application/json",
        headers=exc.headers,
    )


def admin_only(fn: AdminHandler) -> AdminHandler:
    """Refuse unless ``Authorization: Bearer <admin.key>``; turn Reject into an error body."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        secret = request.app[GATEWAY].runtime.loaded.policy.admin.key
        try:
            if secret is None:
                raise Reject(
                    403,
                    "the admin API is disabled: set admin.key in the policy",
                    code="admin_disabled",
                )
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            # surrogateescape gives back the bytes as sent: aiohttp decodes headers (and Python
            # the environment a $env secret comes from) with it, so neither can make encode fail
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode("utf-8", "surrogateescape"),
                secret.get_secret_value().encode("utf-8", "surrogateescape"),
            ):
                raise Reject(401, "a valid admin key is required", code="invalid_admin_key")
            return await fn(request)
        except Reject as e:
            return _error(e)
        except ShuttingDown as e:  # an admin query, invoice or export stopped by the shutdown
            return _error(_shutting_down(e))
        except Exception as e:
            if is_state_error(e):  # e.g. forgetting a user's quota counts with Redis down
                return _error(_state_unavailable(e, "retry when it is back"))
            # %r: a decoded path may hold a newline (%0A) that would forge a log line
            log.exception("admin request %s %r failed", request.method, request.path)
            return _error(Reject(500, "internal gateway error", code="internal_error"))

    return wrapped


async def _body(request: web.Request) -> dict[str, object]:
    try:
        data = orjson.loads(await request.read() or b"{}")
    except web.HTTPRequestEntityTooLarge:  # over client_max_size (listen.max_body_bytes)
        raise Reject(413, "request body is too large", code="request_too_large") from None
    except orjson.JSONDecodeError:
        raise Reject(400, "request body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise Reject(400, "request body must be a JSON object", code="invalid_json")
    return data


def _shutting_down(exc: ShuttingDown) -> Reject:
    return Reject(503, str(exc), code="shutting_down", headers={"Retry-After": "1"})


def _state_unavailable(exc: Exception, what: str) -> Reject:
    log.warning("shared key store unreachable: %s", type(exc).__name__)
    return Reject(
        503,
        f"the shared state (state.url) is unreachable; {what}",
        code="state_unavailable",
        headers={"Retry-After": "1"},
    )


@admin_only
async def create_key(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    data = await _body(request)
    user, tier = data.get("user"), data.get("tier")
    if not isinstance(user, str) or not user.strip():
        raise Reject(400, "'user' is required", code="invalid_request", param="user")
    tiers = gw.runtime.loaded.policy.tiers
    if not isinstance(tier, str) or (tiers and tier not in tiers):
        raise Reject(
            400,
            f"'tier' must be one of: {', '.join(tiers) or 'any string'}",
            code="invalid_request",
            param="tier",
        )
    unknown = set(data) - {"user", "tier", *keyspec.FIELDS}
    if unknown:
        field = sorted(unknown)[0]
        raise Reject(400, f"unknown field {field!r}", code="invalid_request", param=field)
    lifecycle = keyspec.parse(data, time.time())
    _check_plan(request, tier, lifecycle)
    rec, key = gw.keystore.create(user.strip(), tier, **lifecycle)
    if gw.keysync is not None:  # every instance must accept it before anyone holds it
        try:
            await gw.keysync.add(rec)
        except Exception as e:
            gw.keystore.revoke(rec.id)  # never a key that only this instance knows
            raise _state_unavailable(e, "no key was created") from None
    return _json({**_shown(request, rec), "key": key}, status=201)


def _check_plan(request: web.Request, tier: str, values: dict[str, object]) -> None:
    rt = request.app[GATEWAY].runtime
    keyspec.check_plan(
        rt.loaded.policy,
        tier,
        values.get("models"),  # type: ignore[arg-type]
        values.get("features"),  # type: ignore[arg-type]
        values.get("rpm"),  # type: ignore[arg-type]
        rt.chain.model_names,
    )


def _shown(request: web.Request, rec: KeyRecord) -> dict[str, object]:
    """A key as the admin API shows it: its record (never the hash or the secret) and, when
    a retired secret is still accepted after a rotation, until when."""
    grace = request.app[GATEWAY].keystore.grace_of(rec.id, time.time())
    return {**rec.public(), "previous_key_valid_until": grace}


def _key_of(request: web.Request) -> KeyRecord:
    key_id = request.match_info["key_id"]
    rec = request.app[GATEWAY].keystore.get(key_id)
    if rec is None:
        raise Reject(404, f"no key with id {key_id}", code="not_found")
    return rec


@admin_only
async def list_keys(request: web.Request) -> web.StreamResponse:
    user = request.query.get("user")
    recs = request.app[GATEWAY].keystore.list()
    return _json({"data": [_shown(request, r) for r in recs if user is None or r.user == user]})


@admin_only
async def show_key(request: web.Request) -> web.StreamResponse:
    return _json(_shown(request, _key_of(request)))


@admin_only
async def update_key(request: web.Request) -> web.StreamResponse:
    """Change a key's attributes (only the fields sent; null clears one). Scopes and the rate
    are checked against the key's plan as they will be after the change."""
    gw = request.app[GATEWAY]
    rec = _key_of(request)
    if rec.source != "api":
        raise Reject(400, "a key declared in the policy is changed there", code="invalid_request")
    data = await _body(request)
    unknown = set(data) - {"tier", *keyspec.FIELDS}
    if unknown:
        field = sorted(unknown)[0]
        raise Reject(400, f"unknown field {field!r}", code="invalid_request", param=field)
    changes = keyspec.parse(data, time.time())
    if "tier" in data:
        tiers = gw.runtime.loaded.policy.tiers
        tier = data["tier"]
        if not isinstance(tier, str) or (tiers and tier not in tiers):
            raise Reject(
                400,
                f"'tier' must be one of: {', '.join(tiers) or 'any string'}",
                code="invalid_request",
                param="tier",
            )
        changes["tier"] = tier
    merged = {"models": rec.models, "features": rec.features, "rpm": rec.rpm, **changes}
    _check_plan(request, str(changes.get("tier", rec.tier)), merged)
    before = gw.keystore.secrets_of(rec.id)
    new = gw.keystore.update(rec.id, **changes)
    assert new is not None
    if gw.keysync is not None:
        try:
            await gw.keysync.add(new)
        except Exception as e:
            for old in before:  # back as it was: no change that only this instance knows
                gw.keystore.apply_restore(old)
            raise _state_unavailable(e, "the key was not changed") from None
    return _json(_shown(request, new))


@admin_only
async def rotate_key(request: web.Request) -> web.StreamResponse:
    """A new secret for the key (shown once); the old one is accepted for ``grace`` more
    (default 24h, ``0`` ends it at once), then refused as expired by rotation."""
    gw = request.app[GATEWAY]
    rec = _key_of(request)
    if rec.source != "api":
        raise Reject(400, "a key declared in the policy is rotated there", code="invalid_request")
    data = await _body(request)
    unknown = set(data) - {"grace"}
    if unknown:
        field = sorted(unknown)[0]
        raise Reject(400, f"unknown field {field!r}", code="invalid_request", param=field)
    try:
        grace = parse_duration(data.get("grace", "24h"))
    except ValueError as e:
        raise Reject(400, f"'grace' {e}", code="invalid_request", param="grace") from None
    rotated = gw.keystore.rotate(rec.id, grace)
    assert rotated is not None
    new, old, key = rotated
    if gw.keysync is not None:  # the new secret first: every instance knows it, then the old
        try:
            await gw.keysync.add(new, old)
        except Exception as e:
            gw.keystore.forget_secret(new)
            gw.keystore.apply_restore(rec)
            raise _state_unavailable(e, "the key was not rotated") from None
    out = {**_shown(request, new), "key": key, "previous_key_valid_until": old.grace_until}
    return _json(out, status=201)


@admin_only
async def revoke_key(request: web.Request) -> web.StreamResponse:
    key_id = request.match_info["key_id"]
    gw = request.app[GATEWAY]
    rec = gw.keystore.get(key_id)
    if rec is None:
        raise Reject(404, f"no key with id {key_id}", code="not_found")
    if gw.keysync is not None:  # everywhere first: a failure leaves the key valid everywhere
        try:
            await gw.keysync.remove(gw.keystore.secrets_of(key_id))
        except Exception as e:
            raise _state_unavailable(e, "the key was not revoked") from None
    gw.keystore.revoke(key_id)
    return _json({"id": key_id, "revoked": True})


@admin_only
async def reload_policy(request: web.Request) -> web.StreamResponse:
    try:
        rt = await request.app[GATEWAY].reload()
    except PolicyError as e:
        return _json({"status": "refused", "errors": e.errors}, status=400)
    return _json({"status": "reloaded", "plugins": list(rt.chain.names)})


def _usage(request: web.Request) -> AnalyticsBackend:
    backend = request.app[RESOURCES].find(ANALYTICS)
    if backend is None:
        raise Reject(
            404,
            "no usage database in this process: add the metering plugin to the chain (with "
            "metering.sink redis, query `tollway meter` instead)",
            code="metering_disabled",
        )
    return backend


@admin_only
async def run_sql(request: web.Request) -> web.StreamResponse:
    data = await _body(request)
    query = data.get("query")
    if not isinstance(query, str) or not query.strip():
        raise Reject(400, "'query' is required", code="invalid_request", param="query")
    FRESH_AS_OF.set(None)  # the backend sets it (one task may serve several requests)
    try:
        columns, rows = await _usage(request).sql(query)
    except ReadOnlyQuery as e:
        raise Reject(403, f"read-only: {e}", code="read_only") from None
    except ShuttingDown as e:  # before QueryError, its base
        raise _shutting_down(e) from None
    except QueryBusy as e:
        raise Reject(429, str(e), code="too_many_queries", headers={"Retry-After": "1"}) from None
    except QueryTimeout as e:  # 4xx: the same query would fail again; it must change
        raise Reject(400, str(e), code="query_timeout", param="query") from None
    except ResultTooLarge as e:
        raise Reject(400, str(e), code="result_too_large", param="query") from None
    except QueryError as e:
        raise Reject(400, str(e), code="sql_error") from None
    body = orjson.dumps(
        {"columns": columns, "rows": rows}, default=json_default, option=orjson.OPT_NON_STR_KEYS
    )
    fresh = FRESH_AS_OF.get()
    headers = {"X-Tollway-Fresh-As-Of": f"{fresh:.3f}"} if fresh is not None else None
    return web.Response(body=body, content_type="application/json", headers=headers)


@admin_only
async def get_invoice(request: web.Request) -> web.StreamResponse:
    user = request.match_info["user"]
    month = request.query.get("month", "")
    if not _MONTH.match(month):
        raise Reject(400, "'month' must be YYYY-MM", code="invalid_request", param="month")
    invoice = await _usage(request).invoice(user, month)
    if request.query.get("format") == "csv":
        return web.Response(text=invoice_csv(invoice), content_type="text/csv")
    return web.Response(body=orjson.dumps(invoice), content_type="application/json")


@admin_only
async def export(request: web.Request) -> web.StreamResponse:
    data = await _body(request)
    folder = data.get("dir")
    if not isinstance(folder, str) or not folder:
        raise Reject(400, "'dir' is required", code="invalid_request", param="dir")
    try:
        path, rows = await _usage(request).export_parquet(folder)
    except InvalidExportPath as e:
        raise Reject(400, str(e), code="invalid_request", param="dir") from None
    return _json({"dir": folder, "path": path, "rows": rows})


@admin_only
async def forget_user(request: web.Request) -> web.StreamResponse:
    """Delete everything Tollway keeps about a user: issued keys, then what each plugin holds
    (usage rows, cache entries, quota counts...). Answers with the counts per kind."""
    user = request.match_info["user"]
    gw = request.app[GATEWAY]
    if gw.keysync is not None:
        try:
            await gw.keysync.remove(gw.keystore.issued_to(user))
        except Exception as e:
            raise _state_unavailable(e, "nothing was deleted") from None
    keys, kept = gw.keystore.forget_user(user)
    deleted: dict[str, int] = {"keys": len(keys)}
    for hook in gw.runtime.chain.forget_user:
        for kind, n in ((await hook(user)) or {}).items():
            deleted[kind] = deleted.get(kind, 0) + n
    log.info("deleted the data of a user on request (%s)", deleted)
    return _json({"user": user, "deleted": deleted, "policy_keys_kept": kept})


def add_routes(
    app: web.Application, wrap: Callable[[AdminHandler], AdminHandler] = lambda h: h
) -> None:
    """Register the admin API and the dashboard, each handler passed through ``wrap`` (the
    app's ``with_request_id``)."""
    app.router.add_post("/admin/keys", wrap(create_key))
    app.router.add_get("/admin/keys", wrap(list_keys))
    app.router.add_get("/admin/keys/{key_id}", wrap(show_key))
    app.router.add_patch("/admin/keys/{key_id}", wrap(update_key))
    app.router.add_post("/admin/keys/{key_id}/rotate", wrap(rotate_key))
    app.router.add_delete("/admin/keys/{key_id}", wrap(revoke_key))
    app.router.add_post("/admin/reload", wrap(reload_policy))
    app.router.add_post("/admin/sql", wrap(run_sql))
    app.router.add_get("/admin/invoices/{user}", wrap(get_invoice))
    app.router.add_post("/admin/export", wrap(export))
    app.router.add_delete("/admin/users/{user}/data", wrap(forget_user))
    app.router.add_get("/admin/stats", wrap(admin_only(dashboard.stats)))
    app.router.add_get("/dashboard", wrap(dashboard.page))
