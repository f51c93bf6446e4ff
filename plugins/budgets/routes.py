"""``PUT/GET/DELETE /admin/budgets/{user}``: a user's own budget, behind the admin key.

``PUT`` takes a budget as the policy writes one (``{"usd": 5, "basis": "price", "alerts":
[50, 80, 100], "hard": true}``; ``usd`` required) and replaces the tier's for that user at
once, on every instance sharing the state. ``GET`` answers the budget in force (the user's
own, else the tier of the user's newest key) and the month's spending (``?month=YYYY-MM``,
default the current one). ``DELETE`` gives the user the tier's budget back.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from pydantic import ValidationError

from proxy.admin import admin_only
from proxy.appkeys import KEYSTORE
from proxy.errors import Reject
from proxy.policy import Budget
from proxy.statewatch import is_state_error

if TYPE_CHECKING:
    from plugins.budgets.plugin import BudgetsPlugin

_MONTH = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _unavailable() -> Reject:
    return Reject(
        503,
        "the shared state (state.url) is unreachable; the budget was not changed",
        code="state_unavailable",
        headers={"Retry-After": "1"},
    )


def routes(plugin: BudgetsPlugin) -> list[web.RouteDef]:
    """The admin routes, bound to the live chain's plugin."""

    def tier_of(request: web.Request, user: str) -> str | None:
        records = [r for r in request.app[KEYSTORE].list() if r.user == user]
        return records[-1].tier if records else None

    async def show(request: web.Request) -> web.StreamResponse:
        user = request.match_info["user"]
        month = request.query.get("month")
        if month is not None and not _MONTH.match(month):
            raise Reject(400, "'month' must be YYYY-MM", code="invalid_request", param="month")
        return _json(await plugin.status(user, tier_of(request, user), month))

    async def put(request: web.Request) -> web.StreamResponse:
        user = request.match_info["user"]
        try:
            data = orjson.loads(await request.read() or b"{}")
        except orjson.JSONDecodeError:
            raise Reject(400, "request body is not valid JSON", code="invalid_json") from None
        try:
            budget = Budget.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "body"
            msg = str(err["msg"]).removeprefix("Value error, ")
            raise Reject(400, f"{where}: {msg}", code="invalid_request", param=where) from None
        assert plugin.users is not None
        try:
            await plugin.users.put(user, {"budget": budget.model_dump()})
        except Exception as e:
            if is_state_error(e):
                raise _unavailable() from None
            raise
        return _json(await plugin.status(user, tier_of(request, user)))

    async def clear(request: web.Request) -> web.StreamResponse:
        user = request.match_info["user"]
        assert plugin.users is not None
        try:
            cleared = await plugin.users.forget(user)
        except Exception as e:
            if is_state_error(e):
                raise _unavailable() from None
            raise
        if not cleared:
            raise Reject(404, f"user {user!r} has no budget of their own", code="not_found")
        return _json(await plugin.status(user, tier_of(request, user)))

    path = "/admin/budgets/{user}"
    return [
        web.get(path, admin_only(show)),
        web.put(path, admin_only(put)),
        web.delete(path, admin_only(clear)),
    ]
