"""Issued keys shared by instances through a real redis-server (``state.url: redis://``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from proxy.keystore import KeyStore
from tests.conftest import ADMIN_KEY, Gw
from tests.conftest import policy as base_policy
from tests.procs import until

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT = {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "hi"}]}


def policy(url: str, state_dir: Path | None = None) -> dict[str, Any]:
    return base_policy(state={"dir": state_dir, "url": url})


async def status(gw: Gw, key: str) -> int:
    async with gw.http.post(
        f"{gw.url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        await r.read()
        return r.status


async def eventually(gw: Gw, key: str, expected: int) -> None:
    """Announcements take a moment to arrive: wait up to 3 s for ``expected``."""

    async def answers() -> bool:
        return await status(gw, key) == expected

    await until(answers, 3.0, f"the key answering {expected}")


async def test_instances_share_issued_keys(
    make_gateway: Any, redis_url: str, tmp_path: Path
) -> None:
    url = redis_url
    # a key in one instance's keys.json from before Redis was used: that instance seeds it
    local = KeyStore(tmp_path / "keys.json")
    _, old_key = local.create("olga", "pro")
    gw1 = await make_gateway("chain:\n  - name: auth\n", base=policy(url, tmp_path))
    gw2 = await make_gateway("chain:\n  - name: auth\n", base=policy(url))
    assert await status(gw2, old_key) == 200

    async with gw1.http.post(
        f"{gw1.url}/admin/keys", json={"user": "ann", "tier": "pro"}, headers=ADMIN
    ) as r:
        made = await r.json()
    await eventually(gw2, made["key"], 200)  # created on one instance, valid on the other
    with redis.Redis.from_url(url) as r:
        stored = b"".join(r.hgetall("tollway:keys:records").values())
    assert made["key"].encode() not in stored  # Redis holds hashes, never keys

    gw3 = await make_gateway("chain:\n  - name: auth\n", base=policy(url))
    assert await status(gw3, made["key"]) == 200  # a new instance loads every key at start

    async with gw2.http.delete(f"{gw2.url}/admin/keys/{made['id']}", headers=ADMIN) as r:
        assert r.status == 200
    await eventually(gw1, made["key"], 401)  # revoked on one, refused by all
    await eventually(gw3, made["key"], 401)

    async with gw3.http.delete(f"{gw3.url}/admin/users/olga/data", headers=ADMIN) as r:
        assert (await r.json())["deleted"]["keys"] == 1
    await eventually(gw1, old_key, 401)
    await eventually(gw2, old_key, 401)
    assert "olga" not in (tmp_path / "keys.json").read_text()  # gone from the file too


async def test_no_key_exists_on_one_instance_only(make_gateway: Any, redis_url: str) -> None:
    """With Redis unreachable, creating a key fails and leaves no key behind; revoking fails
    and leaves the key valid (on every instance, not just the others)."""
    url = redis_url
    gw = await make_gateway("chain:\n  - name: auth\n", base=policy(url))
    async with gw.http.post(
        f"{gw.url}/admin/keys", json={"user": "ann", "tier": "pro"}, headers=ADMIN
    ) as r:
        made = await r.json()
    sync = gw.gateway.keysync
    assert sync is not None
    working = sync.client
    sync.client = aioredis.from_url("redis://127.0.0.1:1/0")  # nothing listens there
    try:
        async with gw.http.post(
            f"{gw.url}/admin/keys", json={"user": "bob", "tier": "pro"}, headers=ADMIN
        ) as r:
            assert r.status == 503
            assert (await r.json())["error"]["code"] == "state_unavailable"
        assert not [k for k in gw.gateway.keystore.list() if k.user == "bob"]
        async with gw.http.delete(f"{gw.url}/admin/keys/{made['id']}", headers=ADMIN) as r:
            assert r.status == 503
        assert await status(gw, made["key"]) == 200
    finally:
        await sync.client.aclose()
        sync.client = working


async def test_lifecycle_holds_on_every_instance(make_gateway: Any, redis_url: str) -> None:
    """Scopes, the key's own rate, expiry, updates and rotation, with two gateways on one
    Redis: what one instance's admin API decides, the other enforces."""
    base = {**policy(redis_url), "features": {"basic_suggestions": {}, "confidence_analysis": {}}}
    base["tiers"]["pro"]["features"] = ["confidence_analysis"]
    chain = "chain:\n  - name: auth\n  - name: limits\n"
    gw1 = await make_gateway(chain, base=base)
    gw2 = await make_gateway(chain, base=base)
    body = {"user": "ann", "tier": "pro", "scopes": {"models": ["gpt-5.4-mini"]}, "rpm": 2}
    async with gw1.http.post(f"{gw1.url}/admin/keys", json=body, headers=ADMIN) as r:
        made = await r.json()
    key = made["key"]
    await eventually(gw2, key, 200)  # 1 of the key's 2 a minute, on gw2
    claude = {"model": "claude-sonnet", "max_tokens": 5, "messages": CHAT["messages"]}
    async with gw2.http.post(
        f"{gw2.url}/v1/messages", json=claude, headers={"x-api-key": key}
    ) as r:
        refused = await r.json()
        assert r.status == 403 and refused["error"]["type"] == "permission_error"
        assert "'claude-sonnet' is outside this API key's scopes" in refused["error"]["message"]
    assert await status(gw1, key) == 200  # 2 of 2: one window for both instances
    assert await status(gw2, key) == 429

    # an update on gw2 (no rate of its own, more models) is enforced on gw1
    change = {"rpm": None, "scopes": {"models": ["gpt-5.4-mini", "claude-sonnet"]}}
    async with gw2.http.patch(
        f"{gw2.url}/admin/keys/{made['id']}", json=change, headers=ADMIN
    ) as r:
        assert r.status == 200
    await eventually(gw1, key, 200)

    # a rotation on gw1: the new secret works on gw2; the old one until its grace ends
    async with gw1.http.post(
        f"{gw1.url}/admin/keys/{made['id']}/rotate", json={"grace": "1s"}, headers=ADMIN
    ) as r:
        rotated = await r.json()
    await eventually(gw2, rotated["key"], 200)
    await eventually(gw2, key, 401)  # the grace period ended
    async with gw2.http.post(
        f"{gw2.url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        assert (await r.json())["error"]["code"] == "key_expired"
    with redis.Redis.from_url(redis_url) as r:
        stored = b"".join(r.hgetall("tollway:keys:records").values())
    assert rotated["key"].encode() not in stored and key.encode() not in stored

    # an expiry set on one instance is a time every instance compares with
    async with gw1.http.patch(
        f"{gw1.url}/admin/keys/{made['id']}", json={"expires_in": "1s"}, headers=ADMIN
    ) as r:
        assert r.status == 200
    await eventually(gw2, rotated["key"], 401)
    async with gw2.http.post(
        f"{gw2.url}/v1/chat/completions",
        json=CHAT,
        headers={"Authorization": f"Bearer {rotated['key']}"},
    ) as r:
        assert "expired at" in (await r.json())["error"]["message"]
