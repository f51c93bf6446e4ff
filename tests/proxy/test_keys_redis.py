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
