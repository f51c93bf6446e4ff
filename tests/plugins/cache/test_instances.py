"""Identical requests in flight on different instances make one provider call, through the
shared (Redis) cache's flight lock: real redis-server, two gateways, the emulator's counter."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
import redis

from tests.conftest import BASE_POLICY, Emulator, Gw

KEY = "c" * 64
MSG = [{"role": "user", "content": "one call for every instance"}]


@pytest.fixture
async def pair(make_gateway: Any, redis_server: str, emulator: Emulator) -> tuple[Gw, Gw]:
    url = f"{redis_server}/11"  # this module's own database
    with redis.Redis.from_url(url) as r:
        r.flushdb()
    base = BASE_POLICY.replace("state: {{dir: null}}", f"state: {{{{dir: null, url: '{url}'}}}}")
    chain = (
        "chain:\n  - name: auth\n  - name: cache\n"
        f"    config: {{backend: state, key: '{KEY}', scope: global, default_ttl: 1h}}\n"
    )
    gws = (await make_gateway(chain, base=base), await make_gateway(chain, base=base))
    await emulator.reset()
    return gws


async def ask(gw: Gw, key: str, **headers: str) -> tuple[str, str]:
    raw = await gw.openai(key, max_retries=0).chat.completions.with_raw_response.create(
        model="gpt-5.4-mini",
        messages=MSG,  # type: ignore[arg-type]
        extra_headers=headers,
    )
    return raw.headers["x-tollway-cache"], raw.parse().choices[0].message.content or ""


async def test_one_call_across_instances(pair: tuple[Gw, Gw], emulator: Emulator) -> None:
    gw1, gw2 = pair
    k1, k2 = await gw1.create_key("ann"), await gw2.create_key("bob")
    slow = {"x-emulator-latency-ms": "600"}
    first = asyncio.create_task(ask(gw1, k1, **slow))
    await asyncio.sleep(0.2)  # the first is in flight on instance 1
    others = await asyncio.gather(*(ask(gw2, k2, **slow) for _ in range(3)))
    lead = await first
    assert (await emulator.stats())["requests"] == 1
    assert lead[0] == "miss" and {c for c, _ in others} == {"hit"}
    assert {t for _, t in others} == {lead[1]}
    async with gw2.http.get(f"{gw2.url}/metrics") as r:
        assert "tollway_cache_coalesced_instances_total 3.0" in await r.text()


async def test_a_failed_leader_lets_the_others_ask(pair: tuple[Gw, Gw], emulator: Emulator) -> None:
    """The first request fails (three failed attempts): the lock is released without an
    answer, and the request waiting on the other instance calls the provider itself."""
    gw1, gw2 = pair
    k1, k2 = await gw1.create_key("ann"), await gw2.create_key("bob")
    fail = {"x-emulator-fail-times": "3", "x-emulator-key": "leader", "x-emulator-status": "500"}
    first = asyncio.create_task(ask(gw1, k1, **fail, **{"x-emulator-latency-ms": "300"}))
    await asyncio.sleep(0.2)
    second = await ask(gw2, k2)
    with pytest.raises(openai.InternalServerError):
        await first
    assert second[0] == "miss" and second[1]
    assert (await emulator.stats())["requests"] == 4  # 3 failed attempts, then the second's
