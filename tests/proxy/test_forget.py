"""``DELETE /admin/users/{user}/data`` and usage retention: what a user asks to be forgotten
is gone from every store (keys, usage rows, cache entries, quota counts), nobody else's is."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import openai
import pytest

from plugins.metering.plugin import UsageStore
from proxy.analytics import ANALYTICS
from proxy.appkeys import RESOURCES
from tests.conftest import ADMIN_KEY, Emulator, Gw

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def chain(db: Path, retention: str = "null") -> str:
    return (
        "chain:\n  - name: auth\n  - name: limits\n    config: {}\n"
        "  - name: cache\n    config: {default_ttl: 1h}\n"
        f"  - name: metering\n    config: {{database: {db}, retention: {retention}}}\n"
    )


async def ask(gw: Gw, key: str, text: str) -> str:
    raw = await gw.openai(key, max_retries=0).chat.completions.with_raw_response.create(
        model="gpt-5.4-mini", messages=[{"role": "user", "content": text}]
    )
    return raw.headers["x-tollway-cache"]


async def rows(gw: Gw, user: str) -> int:
    async with gw.http.post(
        f"{gw.url}/admin/sql",
        json={"query": f"SELECT count(*) FROM usage WHERE user_id = '{user}'"},
        headers=ADMIN,
    ) as r:
        return int((await r.json())["rows"][0][0])


async def test_forget_a_user(make_gateway: Any, emulator: Emulator, tmp_path: Path) -> None:
    gw: Gw = await make_gateway(chain(tmp_path / "usage.duckdb"))
    ann, ann2, bob = (
        await gw.create_key("ann"),
        await gw.create_key("ann"),
        await gw.create_key("bob"),
    )
    for key, text in ((ann, "ann one"), (ann, "ann one"), (ann2, "ann two"), (bob, "bob one")):
        await ask(gw, key, text)
    assert await rows(gw, "ann") == 3  # loaded or still in the spool: both count
    url = f"{gw.url}/admin/users/ann/data"
    async with gw.http.delete(url) as r:
        assert r.status == 401  # the admin key is required
    async with gw.http.delete(url, headers=ADMIN) as r:
        assert r.status == 200
        body = await r.json()
    assert body == {
        "user": "ann",
        "deleted": {"keys": 2, "quota_months": 1, "cache_entries": 2, "usage_rows": 3},
        "policy_keys_kept": 0,
    }
    assert await rows(gw, "ann") == 0 and await rows(gw, "bob") == 1
    with pytest.raises(openai.AuthenticationError):
        await ask(gw, ann, "ann one")
    await emulator.reset()
    assert await ask(gw, bob, "bob one") == "hit"  # bob's answer is still cached
    again = await gw.create_key("ann")
    assert await ask(gw, again, "ann one") == "miss"  # ann's is not
    assert (await emulator.stats())["requests"] == 1
    async with gw.http.delete(f"{gw.url}/admin/users/nobody/data", headers=ADMIN) as r:
        assert (await r.json())["deleted"] == {
            "keys": 0,
            "quota_months": 0,
            "cache_entries": 0,
            "usage_rows": 0,
        }


async def stats_users(gw: Gw) -> list[str]:
    async with gw.http.get(f"{gw.url}/admin/stats", headers=ADMIN) as r:
        assert r.status == 200
        stats = await r.json()
    (table,) = [t for t in stats["tables"] if t["name"] == "top_users"]
    assert [u["user_id"] for u in stats["usage"]["top_users"]] == [
        row["user_id"] for row in table["rows"]
    ]
    return [row["user_id"] for row in table["rows"]]


async def test_a_forgotten_user_leaves_the_dashboard_at_once(
    make_gateway: Any, tmp_path: Path
) -> None:
    """The dashboard's figures are computed once per few seconds for every poll: a user
    forgotten in between is not shown from that cache afterwards."""
    gw: Gw = await make_gateway(chain(tmp_path / "usage.duckdb"))
    for user in ("ann", "bob"):
        await ask(gw, await gw.create_key(user), f"{user} one")
    assert sorted(await stats_users(gw)) == ["ann", "bob"]
    async with gw.http.delete(f"{gw.url}/admin/users/ann/data", headers=ADMIN) as r:
        assert r.status == 200
    assert await stats_users(gw) == ["bob"]
    assert await sql_rows(gw, "SELECT count(*) FROM user_days WHERE user_id = 'ann'") == [[0]]


async def sql_rows(gw: Gw, query: str) -> list[list[Any]]:
    async with gw.http.post(f"{gw.url}/admin/sql", json={"query": query}, headers=ADMIN) as r:
        assert r.status == 200
        return (await r.json())["rows"]  # type: ignore[no-any-return]


async def test_usage_retention(make_gateway: Any, tmp_path: Path) -> None:
    gw: Gw = await make_gateway(chain(tmp_path / "usage.duckdb", retention="30d"))
    key = await gw.create_key("cy")
    await ask(gw, key, "old news")
    store = gw.app[RESOURCES].find(ANALYTICS)
    assert isinstance(store, UsageStore)
    await store.flush()
    assert await store.prune(time.time() + 29 * 86400) == 0  # checked once an hour at most
    store.pruned_at = 0.0
    assert await store.prune(time.time() + 29 * 86400) == 0  # not 30 days old yet
    store.pruned_at = 0.0
    assert await store.prune(time.time() + 31 * 86400) == 1
    assert await rows(gw, "cy") == 0
