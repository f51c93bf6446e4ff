"""limits with state.url on a real redis-server: two gateway instances enforce one limit."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import BASE_POLICY
from tests.plugins.test_limits import PLANS, limits_chain, post


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """The CI redis on 6379, else one started here; under CI=true this must not skip."""
    if _reachable(6379):
        yield "redis://127.0.0.1:6379/15"
        return
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no redis-server is reachable or installed")
        pytest.skip("no redis-server")
    proc = subprocess.Popen(
        [binary, "--port", "6391", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):
            if _reachable(6391):
                break
            time.sleep(0.1)
        yield "redis://127.0.0.1:6391/15"
    finally:
        proc.terminate()
        proc.wait(5)


async def test_two_instances_share_one_user_limit(make_gateway: Any, redis_url: str) -> None:
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
