"""A rotated-out secret works for its grace period, is refused after it, and does not linger.

Rotation keeps the old secret, retired, for a grace period. Once that has ended the secret is
refused (401) at once, by its ``grace_until``, and then pruned from storage: the instance's
``keys.json`` and the shared Redis hash, at the next rotation, when a file is loaded, and
every ``PRUNE_EVERY`` seconds, so a secret that leaked is not kept for ever.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from proxy import keystore
from proxy.keystore import KeyStore, hash_key
from tests.conftest import ADMIN_KEY, Gw, policy
from tests.procs import until

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT = {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "hi"}]}


async def ask(gw: Gw, key: str) -> tuple[int, str | None]:
    """(status, error code) of one chat request with ``key``."""
    async with gw.http.post(
        f"{gw.url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        body = await r.json()
        return r.status, (body.get("error") or {}).get("code")


async def issue(gw: Gw, user: str) -> dict[str, Any]:
    async with gw.http.post(
        f"{gw.url}/admin/keys", json={"user": user, "tier": "pro"}, headers=ADMIN
    ) as r:
        assert r.status == 201, await r.text()
        return dict(await r.json())


async def rotate(gw: Gw, key_id: str, grace: str) -> dict[str, Any]:
    async with gw.http.post(
        f"{gw.url}/admin/keys/{key_id}/rotate", json={"grace": grace}, headers=ADMIN
    ) as r:
        assert r.status == 201, await r.text()
        return dict(await r.json())


def stored(path: Path) -> set[str]:
    """The hashes of the secrets a ``keys.json`` holds."""
    return {k["sha256"] for k in orjson.loads(path.read_bytes())["keys"]}


async def test_an_expired_secret_is_refused_then_pruned_at_rotation_and_load(
    make_gateway: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keystore, "PRUNE_EVERY", 3600.0)  # no periodic pruning in this test
    gw = await make_gateway(base=policy(state={"dir": tmp_path / "state"}))
    path = tmp_path / "state" / "keys.json"
    ann = await issue(gw, "ann")
    new = await rotate(gw, ann["id"], "1s")
    old_sha = hash_key(ann["key"])
    assert await ask(gw, ann["key"]) == (200, None)  # the grace period
    assert await ask(gw, new["key"]) == (200, None)

    async def old_refused() -> bool:
        return await ask(gw, ann["key"]) == (401, "key_expired")

    await until(old_refused, 5.0, "the grace period ending")
    assert old_sha in stored(path)  # refused by its expiry, before any pruning

    # the next rotation (of any key) prunes it
    bob = await issue(gw, "bob")
    bob_new = await rotate(gw, bob["id"], "1h")
    held = stored(path)
    assert old_sha not in held and hash_key(new["key"]) in held
    assert hash_key(bob["key"]) in held  # bob's old secret: its grace runs for an hour
    assert await ask(gw, ann["key"]) == (401, "invalid_api_key")
    for key in (new["key"], bob["key"], bob_new["key"]):
        assert await ask(gw, key) == (200, None)

    # loading a file prunes too: a rotation with no grace leaves the old secret (refused as
    # rotated) until the next pruning; a restart's load is one
    cid = await issue(gw, "cid")
    cid_new = await rotate(gw, cid["id"], "0")
    assert await ask(gw, cid["key"]) == (401, "key_expired")
    assert hash_key(cid["key"]) in stored(path)
    copy = tmp_path / "restarted" / "keys.json"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    loaded = KeyStore(copy)
    assert loaded.lookup(cid["key"]) is None and loaded.lookup(cid_new["key"]) is not None
    assert hash_key(cid["key"]) not in stored(copy)
    assert hash_key(cid_new["key"]) in stored(copy) and hash_key(bob["key"]) in stored(copy)


async def test_every_instance_and_redis_drop_an_expired_secret(
    make_gateway: Any, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keystore, "PRUNE_EVERY", 0.3)
    gws = [
        await make_gateway(base=policy(state={"url": redis_url, "dir": tmp_path / name}))
        for name in ("a", "b")
    ]
    ann = await issue(gws[0], "ann")
    new = await rotate(gws[0], ann["id"], "2s")
    old_sha, new_sha = hash_key(ann["key"]), hash_key(new["key"])

    async def works_on_both() -> bool:
        return [await ask(gw, ann["key"]) for gw in gws] == [(200, None)] * 2

    await until(works_on_both, 1.5, "the old secret working everywhere in its grace period")

    def in_redis() -> set[str]:
        with redis.Redis.from_url(redis_url) as r:
            return {k.decode() for k in r.hkeys("tollway:keys:records")}

    assert {old_sha, new_sha} <= in_redis()

    def pruned_everywhere() -> bool:
        files = [stored(tmp_path / name / "keys.json") for name in ("a", "b")]
        return old_sha not in in_redis() and all(old_sha not in f for f in files)

    await asyncio.sleep(2.0)
    for gw in gws:  # refused on both, pruned or not
        assert (await ask(gw, ann["key"]))[0] == 401
    await until(pruned_everywhere, 5.0, "the expired secret gone from Redis and both files")
    assert new_sha in in_redis()
    for gw in gws:
        assert await ask(gw, new["key"]) == (200, None)
        assert await ask(gw, ann["key"]) == (401, "invalid_api_key")
