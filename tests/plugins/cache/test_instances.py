"""Identical requests in flight on different instances make one provider call, through the
shared (Redis) cache's flight lock: real redis-server, two gateways, the emulator's counter."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from proxy.context import RequestContext
from proxy.hookspecs import hookimpl
from tests.conftest import Emulator, Gw, policy
from tests.procs import until

KEY = "c" * 64
MSG = [{"role": "user", "content": "one call for every instance"}]


class Gate:
    """After the cache in the chain: holds the first request that passes (the flight's
    leader, its lock taken) until the test opens the gate, so the others arrive while it is
    in flight however slow the machine is, instead of within a guessed latency."""

    opened = asyncio.Event()
    held = 0

    def __init__(self, config: Any, policy: Any) -> None:
        pass

    @hookimpl
    async def access(self, ctx: RequestContext) -> None:
        if Gate.held == 0:
            Gate.held = 1
            await Gate.opened.wait()


@pytest.fixture
async def pair(make_gateway: Any, redis_url: str, emulator: Emulator) -> tuple[Gw, Gw]:
    Gate.opened, Gate.held = asyncio.Event(), 0
    base = policy(state={"url": redis_url})
    chain = [
        {"name": "auth"},
        {
            "name": "cache",
            "config": {"backend": "state", "key": KEY, "scope": "global", "default_ttl": "1h"},
        },
        {"name": "gate"},
    ]
    gws = tuple([await make_gateway(chain, base=base, extra_plugins={"gate": Gate}) for _ in "12"])
    await emulator.reset()
    return gws  # type: ignore[return-value]


def waiting(gw: Gw) -> list[str]:
    """Counts the requests of ``gw`` that wait for another instance's answer (one entry each)."""
    cache = gw.gateway.runtime.chain.plugins[1]
    entered: list[str] = []
    store, await_flight = cache.store, cache.store.await_flight

    async def spy(key: str, longest: float) -> bytes | None:
        entered.append(key)
        return await await_flight(key, longest)  # type: ignore[no-any-return]

    store.await_flight = spy
    return entered


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
    entered = waiting(gw2)
    first = asyncio.create_task(ask(gw1, k1))
    await until(lambda: Gate.held, what="the first in flight on instance 1, its lock taken")
    pending = asyncio.gather(*(ask(gw2, k2) for _ in range(3)))
    await until(lambda: len(entered) == 3, what="three requests waiting on instance 2")
    Gate.opened.set()
    others = await pending
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
    entered = waiting(gw2)
    first = asyncio.create_task(ask(gw1, k1, **fail))
    await until(lambda: Gate.held, what="the first in flight on instance 1, its lock taken")
    pending = asyncio.create_task(ask(gw2, k2))
    await until(lambda: entered, what="the second waiting on instance 2")
    Gate.opened.set()
    second = await pending
    with pytest.raises(openai.InternalServerError):
        await first
    assert second[0] == "miss" and second[1]
    assert (await emulator.stats())["requests"] == 4  # 3 failed attempts, then the second's
