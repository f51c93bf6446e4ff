"""limits with state.url on a real redis-server: two gateway instances enforce one limit."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from tests.conftest import ADMIN_KEY, policy
from tests.plugins.limits.test_limits import BASE, CHAT, limits_chain, post


async def test_two_instances_share_one_user_limit(make_gateway: Any, redis_url: str) -> None:
    base = policy(BASE, state={"url": redis_url})
    user = f"shared-{uuid.uuid4().hex[:8]}"  # a fresh window on a shared server
    chain = limits_chain(user="[3 per 30 second]")
    gw1 = await make_gateway(chain, base=base)
    gw2 = await make_gateway(chain, base=base)
    k1 = await gw1.create_key(user, "pro")
    k2 = await gw2.create_key(user, "pro")  # each instance has its own key store for now
    statuses = [
        (await post(gw, k)).status for gw, k in ((gw1, k1), (gw2, k2), (gw1, k1), (gw2, k2))
    ]
    assert statuses == [200, 200, 200, 429]
    r = await post(gw1, k1)
    assert r.status == 429 and 1 <= int(r.headers["Retry-After"]) <= 60


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_retry_after_covers_every_full_layer(
    make_gateway: Any, request: pytest.FixtureRequest, store: str
) -> None:
    """Both layers full: the 429 names the one that frees up last, in memory and on Redis."""
    base = BASE
    if store == "redis":
        # only this variant needs one; empty, so no earlier test filled the IP layer (127.0.0.1)
        base = policy(BASE, state={"url": request.getfixturevalue("redis_url")})
    gw = await make_gateway(
        limits_chain(ip="[1 per 5 second]", user="[1 per 100 second]"), base=base
    )
    key = await gw.create_key(f"last-{uuid.uuid4().hex[:8]}", "pro")
    assert (await post(gw, key)).status == 200
    async with gw.http.post(
        f"{gw.url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        assert r.status == 429
        assert (await r.json())["error"]["code"] == "user_rate_limit_exceeded"
        assert int(r.headers["Retry-After"]) > 60  # the 100 s layer's wait, not the 5 s one's


async def test_two_instances_share_one_monthly_quota(make_gateway: Any, redis_url: str) -> None:
    """20 requests at once through two instances against a quota of 5: exactly 5 pass, on
    either instance; a failed request gives its place back; forgetting the user resets it."""
    base = policy(
        BASE,
        state={"url": redis_url},
        tiers={"free": {"requests_per_month": 5, "requests_per_minute": None}},
    )
    user = f"quota-{uuid.uuid4().hex[:8]}"
    gw1 = await make_gateway(limits_chain(), base=base)
    gw2 = await make_gateway(limits_chain(), base=base)
    k1, k2 = await gw1.create_key(user, "free"), await gw2.create_key(user, "free")
    failed = await post(gw1, k1, **{"x-emulator-status": "500"})
    assert failed.status == 500  # not counted: the quota is still whole
    replies = await asyncio.gather(
        *(post(gw, k) for _ in range(10) for gw, k in ((gw1, k1), (gw2, k2)))
    )
    assert sorted(r.status for r in replies) == [200] * 5 + [429] * 15
    codes = {(await r.json())["error"]["code"] for r in replies if r.status == 429}
    assert codes == {"monthly_quota_exceeded"}
    async with gw2.http.delete(
        f"{gw2.url}/admin/users/{user}/data", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as r:
        assert (await r.json())["deleted"]["quota_months"] == 1
    k3 = await gw1.create_key(user, "free")
    assert (await post(gw1, k3)).status == 200  # a fresh quota, on every instance
