"""Budgets on a Redis that fails: restarted empty mid-month (the month's spending is put back
from the instances' files, so no part of a budget is handed out twice), and unreachable
(``state.on_unavailable``: ``serve`` decides on this instance, ``refuse`` answers 503 in the
provider's shape). Each test runs its own redis-server, killed and started again empty."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from plugins.budgets.ledger import NANO
from proxy.appkeys import RESOURCES
from proxy.statewatch import STATE_WATCH, StateWatch
from tests.conftest import ADMIN_KEY, GatewayFactory, Gw, policy
from tests.plugins.budgets.conftest import CHAIN, Clock, at, plugin, priced
from tests.procs import until
from tests.security.test_redis_restart import OwnRedis, no_tracebacks
from tests.security.test_redis_restart import own_redis as own_redis

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
MSG = [{"role": "user", "content": "hi"}]
NOW = at(2026, 12, 15)


def base(url: str, state: Path | None, on_unavailable: str = "serve") -> dict[str, Any]:
    """A pro budget of $0.10: ten $0.01 requests."""
    return policy(
        priced(pro={"budget": {"usd": 0.1, "alerts": [50]}}),
        state={
            "url": url,
            "dir": state,
            "check_interval": "200ms",
            "on_unavailable": on_unavailable,
        },
    )


async def start(make_gateway: GatewayFactory, *args: Any) -> Gw:
    gw: Gw = await make_gateway(CHAIN[:2], base=base(*args))
    plugin(gw).clock = Clock(NOW)
    return gw


async def ask(gw: Gw, key: str) -> int:
    """One $0.01 request through the OpenAI SDK: its status."""
    try:
        await gw.openai(key).chat.completions.create(model="gpt-5.4-mini", messages=MSG)  # type: ignore[arg-type]
    except openai.APIStatusError as e:
        return e.status_code
    return 200


def watch(gw: Gw) -> StateWatch:
    found = gw.app[RESOURCES].find(STATE_WATCH)
    assert found is not None
    return found


def spent_in_redis(server: OwnRedis, user: str) -> int:
    """The month's spending in Redis, in nano-USD: the sum of every instance's share."""
    with server.client() as r:
        fields = r.hgetall(f"tollway:budget:u:{user}")
    return sum(int(v) for f, v in fields.items() if f.startswith(b"2026-12/s/"))


async def settled(server: OwnRedis, user: str, usd: float) -> None:
    """Wait for the month's spending in Redis to be ``usd`` (a request settles in ``log``,
    after its last byte reached the client)."""
    want = round(usd * NANO)
    await until(lambda: spent_in_redis(server, user) == want, what=f"${usd} spent in Redis")


async def shown(gw: Gw, user: str) -> dict[str, Any]:
    async with gw.http.get(f"{gw.url}/admin/budgets/{user}", headers=AUTH) as r:
        assert r.status == 200
        return dict(await r.json())


async def test_redis_restarted_empty_hands_out_no_budget_twice(
    own_redis: OwnRedis,
    make_gateway: GatewayFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    a = await start(make_gateway, own_redis.url, tmp_path / "a")
    b = await start(make_gateway, own_redis.url, tmp_path / "b")
    key = await a.create_key("gus", "pro")
    for i in range(8):  # $0.08 of $0.10: 4 through each instance
        assert await ask((a, b)[i % 2], key) == 200
    await settled(own_redis, "gus", 0.08)
    reseeds = [watch(gw).reseeds for gw in (a, b)]

    own_redis.kill()
    own_redis.start()  # empty: no persistence
    assert spent_in_redis(own_redis, "gus") == 0

    def recovered() -> bool:
        return all(
            watch(gw).reseeds > n and watch(gw).available
            for gw, n in zip((a, b), reseeds, strict=True)
        )

    await until(recovered, 10, what="both instances re-seeded and sharing again")
    assert spent_in_redis(own_redis, "gus") == round(0.08 * NANO)  # both shares back
    for gw in (a, b):
        assert (await shown(gw, "gus"))["spent_usd"] == pytest.approx(0.08)
    # a new instance knowing only Redis sees the same month
    c = await start(make_gateway, own_redis.url, tmp_path / "c")
    assert (await shown(c, "gus"))["spent_usd"] == pytest.approx(0.08)
    statuses = [await ask((a, b, c)[i % 3], key) for i in range(6)]
    assert statuses == [200, 200, 402, 402, 402, 402]  # the last $0.02, not $0.10 again
    await settled(own_redis, "gus", 0.10)
    no_tracebacks(caplog)


async def test_redis_down_serve_decides_on_this_instance(
    own_redis: OwnRedis,
    make_gateway: GatewayFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    gw = await start(make_gateway, own_redis.url, tmp_path / "a")
    key = await gw.create_key("hal", "pro")
    for _ in range(5):
        assert await ask(gw, key) == 200  # $0.05 of $0.10, in Redis
    own_redis.kill()
    # alone: this instance's share ($0.05) against the budget; 5 more, then refused
    statuses = [await ask(gw, key) for _ in range(8)]
    assert statuses == [200] * 5 + [402] * 3
    assert not watch(gw).available
    with pytest.raises(anthropic.APIStatusError) as info:  # Anthropic's shape, still a 402
        await gw.anthropic(key).messages.create(model="claude-sonnet", max_tokens=8, messages=MSG)  # type: ignore[arg-type]
    assert info.value.status_code == 402
    assert info.value.body["error"]["type"] == "billing_error"  # type: ignore[index]
    assert (await shown(gw, "hal"))["spent_usd"] == pytest.approx(0.10)

    own_redis.start()  # empty
    await until(lambda: watch(gw).available, 10, what="recovery")
    assert spent_in_redis(own_redis, "hal") == round(0.10 * NANO)  # what was spent alone too
    assert await ask(gw, key) == 402
    no_tracebacks(caplog)
    lines = [r for r in caplog.records if r.name == "tollway.state"]
    assert 2 <= len(lines) <= 4, [r.getMessage() for r in lines]  # not a line per request


async def test_redis_down_refuse_answers_503_in_the_provider_shape(
    own_redis: OwnRedis,
    make_gateway: GatewayFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    gw = await start(make_gateway, own_redis.url, tmp_path / "a", "refuse")
    key = await gw.create_key("ida", "pro")
    assert await ask(gw, key) == 200
    own_redis.kill()
    oa = gw.openai(key)
    for _ in range(10):  # the first finds Redis gone, the later ones are refused at once
        with pytest.raises(openai.APIStatusError) as err:
            await oa.chat.completions.create(model="gpt-5.4-mini", messages=MSG)  # type: ignore[arg-type]
        assert err.value.status_code == 503 and err.value.code == "state_unavailable"
        assert int(err.value.response.headers["Retry-After"]) >= 1
        body = err.value.body
        assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}
    with pytest.raises(anthropic.APIStatusError) as ainfo:
        await gw.anthropic(key).messages.create(model="claude-sonnet", max_tokens=8, messages=MSG)  # type: ignore[arg-type]
    assert ainfo.value.status_code == 503
    assert ainfo.value.body["type"] == "error"  # type: ignore[index]
    assert set(ainfo.value.body["error"]) == {"type", "message"}  # type: ignore[index]
    # nothing was reserved or spent by the refused requests
    assert (await shown(gw, "ida"))["spent_usd"] == pytest.approx(0.01)
    assert (await shown(gw, "ida"))["reserved_usd"] == 0

    own_redis.start()
    await until(lambda: watch(gw).available, 10, what="recovery")
    assert await ask(gw, key) == 200
    await settled(own_redis, "ida", 0.02)
    no_tracebacks(caplog)
    lines = [r for r in caplog.records if r.name == "tollway.state"]
    assert 2 <= len(lines) <= 4, [r.getMessage() for r in lines]


async def test_refuse_also_answers_the_request_that_finds_redis_gone(
    own_redis: OwnRedis,
    make_gateway: GatewayFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Redis that stops answering (SIGSTOP: connections stay open) while a reservation waits
    on it: the outage is noticed during that request, which is still refused (503, as every
    later one), with nothing held for it."""
    caplog.set_level(logging.INFO)
    gw = await start(make_gateway, own_redis.url, tmp_path / "a", "refuse")
    key = await gw.create_key("jo", "pro")
    assert await ask(gw, key) == 200
    await settled(own_redis, "jo", 0.01)
    assert own_redis.proc is not None
    own_redis.proc.send_signal(signal.SIGSTOP)
    try:
        assert watch(gw).available  # not noticed yet: the reservation meets the frozen Redis
        t0 = time.monotonic()
        assert await ask(gw, key) == 503
        assert time.monotonic() - t0 < 15
        assert not watch(gw).available
        assert await ask(gw, key) == 503  # refused at once
        assert (await shown(gw, "jo"))["reserved_usd"] == 0
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    await until(lambda: watch(gw).available, 10, what="recovery")
    assert await ask(gw, key) == 200
    await settled(own_redis, "jo", 0.02)
    no_tracebacks(caplog)
