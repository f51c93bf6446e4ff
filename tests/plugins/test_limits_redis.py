"""limits with state.url on a real redis-server: two gateway instances enforce one limit."""

from __future__ import annotations

import uuid
from typing import Any

from tests.conftest import BASE_POLICY
from tests.plugins.test_limits import PLANS, limits_chain, post


async def test_two_instances_share_one_user_limit(make_gateway: Any, redis_server: str) -> None:
    redis_url = f"{redis_server}/15"
    base = BASE_POLICY.split("features:")[0] + PLANS
    base = base.replace("state: {{dir: null}}", f"state: {{{{dir: null, url: '{redis_url}'}}}}")
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
