"""``GET``/``DELETE /v1/responses/{id}`` and ``GET /v1/responses/{id}/input_items``.

Each route authenticates its caller with the gateway key, like the client endpoints
(``proxy.routeauth.caller``), and reads the record of the id for that caller's user: an id of
another user is a 404, word for word the one an unknown id gets, so nobody learns that an id
exists. A gateway-kept response is answered from its record; a provider-kept one is asked of
that provider (the gateway's credential, never the client's), and a ``DELETE`` removes the
record as well.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web

from plugins.responses.store import ResponseStore
from proxy.errors import Reject
from proxy.routeauth import caller
from proxy.upstream import ProviderClient

_MAX_LIMIT = 100
_DEFAULT_LIMIT = 20


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def not_found(response_id: str) -> Reject:
    return Reject(404, f"Response with id '{response_id}' not found.", type="invalid_request_error")


def _item_ids(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The record's input items, each with an id (items sent without one get a stable id
    from the response's: the cursor ``after`` names items by id)."""
    rid = str(record["id"])
    suffix = rid[5:] if rid.startswith("resp_") else rid
    out = []
    for i, item in enumerate(record.get("items") or ()):
        if isinstance(item, dict) and not item.get("id"):
            item = {"id": f"msg_{suffix}_in{i}", **item}
        out.append(item)
    return out


def page(items: list[dict[str, Any]], query: Any) -> dict[str, Any]:
    """One page of ``items`` (oldest first) as the API lists them: ``order`` (desc by
    default), ``after`` (an item id), ``limit`` (1 to 100, 20 by default)."""
    raw_limit = query.get("limit", str(_DEFAULT_LIMIT))
    try:
        limit = int(raw_limit)
    except ValueError:
        limit = 0
    if not 1 <= limit <= _MAX_LIMIT:
        raise Reject(400, "Invalid 'limit': expected an integer from 1 to 100.", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise Reject(400, "Invalid 'order': expected 'asc' or 'desc'.", param="order")
    ordered = items if order == "asc" else items[::-1]
    start = 0
    after = query.get("after")
    if after is not None:
        ids = [i.get("id") for i in ordered]
        if after not in ids:
            raise Reject(400, f"Invalid 'after': no input item with id '{after}'.", param="after")
        start = ids.index(after) + 1
    chunk = ordered[start : start + limit]
    return {
        "object": "list",
        "data": chunk,
        "first_id": chunk[0]["id"] if chunk else None,
        "last_id": chunk[-1]["id"] if chunk else None,
        "has_more": start + limit < len(ordered),
    }


class ResponseRoutes:
    """The route handlers of one live plugin instance."""

    def __init__(
        self,
        store: ResponseStore,
        read: Callable[[str, str], Awaitable[dict[str, Any] | None]],
        session: aiohttp.ClientSession,
        providers: dict[str, ProviderClient],
    ) -> None:
        self.store = store
        self.read = read  # (id, owner) -> the owner's record; a 503 Reject when unreachable
        self.session = session
        self.providers = providers

    async def _record(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        """The caller's record of the id in the path, or the 404 an unknown id gets."""
        principal = await caller(request)
        response_id = request.match_info["response_id"]
        record = await self.read(response_id, principal.user_id)
        if record is None:
            raise not_found(response_id)
        return response_id, record

    async def _provider(
        self, method: str, record: dict[str, Any], tail: str = "", query: Any = None
    ) -> tuple[int, bytes]:
        """Ask the provider that keeps ``record``'s response: (status, body)."""
        name = str(record.get("provider"))
        client = self.providers.get(name)
        if client is None:
            raise Reject(
                404,
                f"Response with id '{record['id']}' is kept by provider {name}, which this "
                "gateway's policy no longer serves the Responses API from.",
                type="invalid_request_error",
            )
        url = f"{client.base_url}/responses/{quote(str(record['id']), safe='')}{tail}"
        try:
            async with self.session.request(
                method,
                url,
                headers=dict(client.auth_headers),
                params=query,
                timeout=client.timeout,
            ) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError):
            raise Reject(
                502, f"upstream provider {name} could not be reached", code="upstream_unreachable"
            ) from None

    def _relay(self, status: int, body: bytes) -> web.Response:
        return web.Response(body=body, status=status, content_type="application/json")

    async def get(self, request: web.Request) -> web.StreamResponse:
        _, record = await self._record(request)
        if record.get("kind") == "native":
            return self._relay(*await self._provider("GET", record, query=request.query))
        return _json(record["response"])

    async def delete(self, request: web.Request) -> web.StreamResponse:
        response_id, record = await self._record(request)
        answer: web.StreamResponse = _json(
            {"id": response_id, "object": "response", "deleted": True}
        )
        if record.get("kind") == "native" and record.get("provider") in self.providers:
            status, body = await self._provider("DELETE", record)
            if status >= 300 and status != 404:
                return self._relay(status, body)  # the provider still has it: so do we
            if status != 404:
                answer = self._relay(status, body)
        await self.store.delete(response_id, str(record["owner"]))
        return answer

    async def input_items(self, request: web.Request) -> web.StreamResponse:
        _, record = await self._record(request)
        if record.get("kind") == "native":
            status, body = await self._provider("GET", record, "/input_items", query=request.query)
            return self._relay(status, body)
        return _json(page(_item_ids(record), request.query))

    async def delete_at_provider(self, record: dict[str, Any]) -> int:
        """Delete a provider-kept response at its provider (erasure): 1 if it was there, 0 if
        it was already gone (or its provider left the policy: nobody to ask); raises when the
        provider would not delete it."""
        if record.get("provider") not in self.providers:
            return 0
        status, _ = await self._provider("DELETE", record)
        if status == 404:
            return 0
        if status >= 300:
            raise Reject(
                502,
                f"provider {record.get('provider')} did not delete a stored response "
                f"(HTTP {status}); the user's stored responses were kept, retry",
                code="upstream_error",
            )
        return 1
