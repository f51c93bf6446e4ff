"""A Redis that stops answering with its connections open cannot hang the gateway.

A frozen redis-server (SIGSTOP: the kernel keeps its sockets open, nothing is ever read or
answered) is worse than a dead one: a client without a read timeout waits for good. Every
Redis client of the gateway has connect and read timeouts (``proxy.redisurl.timeouts``), so
each request is still answered within about a second (served alone, or refused with the
documented 503, per ``state.on_unavailable``), the admin API too, and all recover once the
server runs again. The test freezes a redis-server of its own, never one it did not start.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.redisurl import timeouts
from tests.conftest import ADMIN_KEY, Gw
from tests.plugins.budgets.conftest import CHAIN as BUDGET_CHAIN
from tests.plugins.budgets.test_redis_failures import base as budget_policy
from tests.procs import until
from tests.security.test_redis_restart import CHAIN, OwnRedis, make_key, policy

CHAT = {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "hi"}]}
DEADLINE = 2.5
"""Seconds a request may take while Redis is frozen: its read timeout (1 s) and some slack;
without the timeouts the first request waited for the frozen server (for ever)."""


@pytest.fixture
def frozen_redis() -> Iterator[OwnRedis]:
    """A redis-server of this test's own; thawed (SIGCONT) and killed whatever happens."""
    server = OwnRedis()
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            server.proc.send_signal(signal.SIGCONT)  # SIGKILL works on a stopped one too,
            server.kill()  # but a thawed one is never left behind stopped


async def timed(gw: Gw, method: str, path: str, key: str, body: Any) -> tuple[int, float, Any]:
    """(status, seconds, JSON body) of one call, failing the test past ``DEADLINE``."""
    start = time.monotonic()
    async with asyncio.timeout(DEADLINE + 5):  # the test's own bound: a hang fails, not stalls
        async with gw.http.request(
            method, f"{gw.url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as r:
            data = await r.json()
            return r.status, time.monotonic() - start, data


def test_every_client_gets_timeouts_unless_the_url_names_them() -> None:
    assert timeouts("redis://h:1/0") == {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}
    assert timeouts("redis://h:1/0?timeout=3") == {
        "socket_timeout": 3.0,
        "socket_connect_timeout": 3.0,
    }
    assert timeouts("redis://h/0?socket_timeout=2&socket_connect_timeout=0.2") == {
        "socket_timeout": 2.0,
        "socket_connect_timeout": 0.2,
    }


@pytest.mark.parametrize("on_unavailable", ["serve", "refuse"])
@pytest.mark.parametrize("chain", ["limits", "budgets"])
async def test_a_frozen_redis_delays_no_request_for_long(
    frozen_redis: OwnRedis, make_gateway: Any, tmp_path: Path, on_unavailable: str, chain: str
) -> None:
    """The limits (windows and monthly quota) and the budgets (reservations on the shared
    ledger) each wait on Redis in a request; the admin API waits on the key sync."""
    if chain == "limits":
        base = policy(frozen_redis.url, tmp_path, on_unavailable)
        gw_chain: Any = CHAIN
    else:
        base = budget_policy(frozen_redis.url, tmp_path, on_unavailable)
        base["tiers"]["pro"]["budget"]["usd"] = 10  # a thousand requests: none runs out
        gw_chain = BUDGET_CHAIN[:2]
    base["state"]["check_interval"] = "1s"  # the watch notices late: requests meet it first
    gw = await make_gateway(gw_chain, base=base)
    made = await make_key(gw, "frank", "pro")
    status, _, _ = await timed(gw, "POST", "/v1/chat/completions", made["key"], CHAT)
    assert status == 200

    assert frozen_redis.proc is not None
    frozen_redis.proc.send_signal(signal.SIGSTOP)
    try:
        answers = [await timed(gw, "POST", "/v1/chat/completions", made["key"], CHAT)]
        answers += await asyncio.gather(
            *(timed(gw, "POST", "/v1/chat/completions", made["key"], CHAT) for _ in range(8))
        )
        answers.append(await timed(gw, "POST", "/v1/chat/completions", made["key"], CHAT))
        expected = 200 if on_unavailable == "serve" else 503
        for status, took, body in answers:
            assert took < DEADLINE, (status, took)
            assert status == expected, body
            if status == 503:
                assert body["error"]["code"] == "state_unavailable"
        # the admin API too: a key that cannot be shared is refused, not left hanging
        status, took, body = await timed(
            gw, "POST", "/admin/keys", ADMIN_KEY, {"user": "gina", "tier": "pro"}
        )
        assert took < DEADLINE and status in (201, 503), (status, took, body)
    finally:
        frozen_redis.proc.send_signal(signal.SIGCONT)

    async def served() -> bool:
        status, _, _ = await timed(gw, "POST", "/v1/chat/completions", made["key"], CHAT)
        return status == 200

    await until(served, 10.0, "recovery after the server runs again")
    status, took, _ = await timed(gw, "POST", "/v1/chat/completions", made["key"], CHAT)
    assert status == 200 and took < DEADLINE
