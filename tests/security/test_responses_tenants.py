"""Stored responses are their user's alone: another user's response id is a 404.

A response id is a handle on a conversation (prompts, answers). Whoever holds another tenant's
id must not read it (``GET``), list its input (``input_items``), delete it, or continue it
(``previous_response_id``): each is a 404 worded exactly as for an id that never existed, so
the answer does not even tell that the id exists. Both kinds are checked: responses the gateway
keeps (a translated model) and responses a provider keeps (asked of it only after the check).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import Emulator, Gw

CHAIN = [{"name": "auth"}, {"name": "responses"}]


async def call(
    http: aiohttp.ClientSession, method: str, url: str, key: str, body: Any = None
) -> tuple[int, dict[str, Any]]:
    async with http.request(
        method, url, json=body, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        return r.status, await r.json()


@pytest.mark.parametrize("model", ["claude-sonnet", "gpt-5.4-mini"])
async def test_another_tenants_id_is_indistinguishable_from_an_unknown_one(
    make_gateway: Callable[..., Any], emulator: Emulator, model: str
) -> None:
    gw: Gw = await make_gateway(CHAIN)
    alice, bob = await gw.create_key("alice"), await gw.create_key("bob")
    status, made = await call(
        gw.http, "POST", f"{gw.url}/v1/responses", alice, {"model": model, "input": "secret"}
    )
    assert status == 200, made
    rid = made["id"]
    before = await emulator.stats()
    for suffix, method in (("", "GET"), ("/input_items", "GET"), ("", "DELETE")):
        status, theirs = await call(gw.http, method, f"{gw.url}/v1/responses/{rid}{suffix}", bob)
        _, unknown = await call(gw.http, method, f"{gw.url}/v1/responses/resp_unknown{suffix}", bob)
        assert status == 404, (method, suffix, theirs)
        assert theirs == {
            "error": {
                **unknown["error"],
                "message": unknown["error"]["message"].replace("resp_unknown", rid),
            }
        }
    status, theirs = await call(
        gw.http,
        "POST",
        f"{gw.url}/v1/responses",
        bob,
        {"model": model, "input": "more", "previous_response_id": rid},
    )
    assert status == 404 and theirs["error"]["param"] == "previous_response_id"
    assert theirs["error"]["message"] == f"Previous response with id '{rid}' not found."
    # nothing of bob's reached the provider: not a read, not a delete, not a continuation
    after = await emulator.stats()
    assert after.get("requests") == before.get("requests")
    status, mine = await call(gw.http, "GET", f"{gw.url}/v1/responses/{rid}", alice)
    assert status == 200 and mine["id"] == rid
