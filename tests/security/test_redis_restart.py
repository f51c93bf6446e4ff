"""A Redis outage or restart cannot take keys, revocations or quotas with it.

Each test starts its own redis-server without persistence (it is killed with SIGKILL and
started again empty on the same port), runs real gateways on it with the auth + limits chain,
and drives them over HTTP with the official SDKs while Redis dies and comes back.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
import redis

from proxy.keystore import KeyStore
from tests.conftest import ADMIN_KEY, Gw, free_port, redis_binary
from tests.conftest import policy as base_policy
from tests.procs import start_redis, until

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT = {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "hi"}]}
CHAIN = "chain:\n  - name: auth\n  - name: limits\n    config: {user: [1000/minute]}\n"
PLANS: dict[str, Any] = {
    "features": {"basic_suggestions": {"price_per_request": 0.01}},
    "tiers": {
        "pro": {
            "requests_per_month": 25000,
            "requests_per_minute": 1000,
            "features": ["basic_suggestions"],
        },
        "trial": {
            "requests_per_month": 6,
            "requests_per_minute": 1000,
            "features": ["basic_suggestions"],
        },
    },
}


class OwnRedis:
    """A redis-server of this test's own (never one it did not start), on a fixed port."""

    def __init__(self) -> None:
        self.binary = redis_binary()  # under CI=true a missing binary fails, never skips
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = start_redis(self.binary, self.port)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save (there is nothing to save it to anyway)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    """Requested before ``make_gateway``, so it outlives the gateways using it."""
    server = OwnRedis()
    server.start()
    yield server
    if server.proc is not None:
        server.kill()


def policy(url: str, state_dir: Path | None, on_unavailable: str = "serve") -> dict[str, Any]:
    state = {
        "dir": state_dir,
        "url": url,
        "check_interval": "200ms",
        "on_unavailable": on_unavailable,
    }
    return {**base_policy(state=state), **PLANS}


async def status(gw: Gw, key: str) -> int:
    async with gw.http.post(
        f"{gw.url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        await r.read()
        return r.status


async def make_key(gw: Gw, user: str, tier: str) -> dict[str, Any]:
    async with gw.http.post(
        f"{gw.url}/admin/keys", json={"user": user, "tier": tier}, headers=ADMIN
    ) as r:
        assert r.status == 201, await r.text()
        return dict(await r.json())


def quota_used(server: OwnRedis, user: str) -> int:
    """The month's total in Redis: the sum of every instance's share."""
    with server.client() as r:
        return sum(int(v) for v in r.hgetall(f"tollway:quota:{user}").values())


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    traced = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not traced, [r.getMessage() for r in traced]
    assert "Traceback" not in caplog.text


async def test_restart_without_data_loses_no_key_and_resets_no_quota(
    own_redis: OwnRedis, make_gateway: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    gw1 = await make_gateway(CHAIN, base=policy(own_redis.url, tmp_path / "a"))
    gw2 = await make_gateway(CHAIN, base=policy(own_redis.url, tmp_path / "b"))
    alice = await make_key(gw1, "alice", "pro")
    bob = await make_key(gw2, "bob", "trial")  # 6 requests a month
    carol = await make_key(gw1, "carol", "pro")
    async with gw2.http.delete(f"{gw2.url}/admin/keys/{carol['id']}", headers=ADMIN) as r:
        assert r.status == 200
    for gw in (gw1, gw2):
        await until(lambda gw=gw: _is(gw, carol["key"], 401), what="carol revoked everywhere")
        assert await status(gw, alice["key"]) == 200
    for i in range(4):  # bob spends 4 of 6, through both instances, with the OpenAI SDK
        sdk = (gw1, gw2)[i % 2].openai(bob["key"])
        await sdk.chat.completions.create(**CHAT)
    assert quota_used(own_redis, "bob") == 4

    statuses: list[int] = []
    stop = asyncio.Event()

    async def traffic() -> None:  # requests run throughout the outage
        while not stop.is_set():
            for gw in (gw1, gw2):
                statuses.append(await status(gw, alice["key"]))
            await asyncio.sleep(0.01)

    runner = asyncio.create_task(traffic())

    def epoch() -> bytes | None:
        with own_redis.client() as r:
            return r.get("tollway:epoch")  # type: ignore[no-any-return]

    await until(lambda: len(statuses) > 2 and epoch(), what="traffic, and the watch's sentinel")
    epoch_before = epoch()
    assert epoch_before  # the watch set its sentinel
    own_redis.kill()
    served_before = len(statuses)

    def outage_served() -> bool:  # requests keep coming (state.on_unavailable: serve)
        noticed = all(not _watch(gw).available for gw in (gw1, gw2))
        return noticed and len(statuses) - served_before > 10

    await until(outage_served, what="the outage noticed by both, with traffic through it")
    assert len(statuses) - served_before > 10  # traffic really ran against a dead Redis
    for gw in (gw1, gw2):
        watch = _watch(gw)
        assert not watch.available and watch.outages == 1  # the outage was noticed
        assert await status(gw, carol["key"]) == 401  # revoked stays revoked
    # bob's 5th request, counted by gw1 alone while Redis is gone
    assert await status(gw1, bob["key"]) == 200

    own_redis.start()  # empty: no persistence
    with own_redis.client() as r:
        assert r.dbsize() <= 2  # at most what the first checks wrote: nothing survived
    for gw in (gw1, gw2):
        await until(lambda gw=gw: _available(gw), 5.0, "recovery")
    stop.set()
    await runner
    assert set(statuses) == {200}, sorted(set(statuses))  # never a 500, never a 401

    with own_redis.client() as r:
        assert r.get("tollway:epoch") != epoch_before  # it was a new, empty Redis
        records = r.hgetall("tollway:keys:records")
        revoked = r.hgetall("tollway:keys:revoked")
    # Redis was re-seeded from the instances' records: keys back, the revocation too
    assert len(records) == 2 and len(revoked) == 1
    assert carol["key"].encode() not in b"".join(records.values())
    assert quota_used(own_redis, "bob") == 5  # 4 before + 1 during the outage: not reset

    gw3 = await make_gateway(CHAIN, base=policy(own_redis.url, None))  # knows only Redis
    for gw in (gw1, gw2, gw3):
        assert await status(gw, alice["key"]) == 200
        assert await status(gw, carol["key"]) == 401
    assert await status(gw3, bob["key"]) == 200  # the 6th and last request of the month
    for gw in (gw1, gw2, gw3):
        sdk = gw.openai(bob["key"])
        with pytest.raises(openai.RateLimitError) as info:
            await sdk.chat.completions.create(**CHAT)
        assert info.value.code == "monthly_quota_exceeded"

    saved = orjson.loads((tmp_path / "a" / "keys.json").read_bytes())
    assert {k["user"] for k in saved["keys"]} == {"alice", "bob"}  # never overwritten with []
    assert len(saved["revoked"]) == 1
    no_tracebacks(caplog)
    outage_lines = [r for r in caplog.records if r.name == "tollway.state"]
    assert 2 <= len(outage_lines) <= 6, [r.getMessage() for r in outage_lines]


async def test_refuse_answers_503_in_the_provider_shape(
    own_redis: OwnRedis, make_gateway: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    gw = await make_gateway(CHAIN, base=policy(own_redis.url, tmp_path, "refuse"))
    made = await make_key(gw, "dana", "pro")
    oa, an = gw.openai(made["key"]), gw.anthropic(made["key"])
    await oa.chat.completions.create(**CHAT)
    msg = {"model": "claude-sonnet", "max_tokens": 16, "messages": CHAT["messages"]}
    await an.messages.create(**msg)

    own_redis.kill()
    refused = 0
    for _ in range(30):  # the first one finds Redis gone, every later one is refused at once
        with pytest.raises(openai.APIStatusError) as info:
            await oa.chat.completions.create(**CHAT)
        err = info.value
        assert err.status_code == 503 and err.code == "state_unavailable"
        assert int(err.response.headers["Retry-After"]) >= 1
        refused += 1
    async with gw.http.post(
        f"{gw.url}/v1/chat/completions",
        json=CHAT,
        headers={"Authorization": f"Bearer {made['key']}"},
    ) as r:
        body = await r.json()
        assert r.status == 503 and set(body["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(anthropic.APIStatusError) as ainfo:
        await an.messages.create(**msg)
    assert ainfo.value.status_code == 503
    assert ainfo.value.body["type"] == "error"  # type: ignore[index]
    assert set(ainfo.value.body["error"]) == {"type", "message"}  # type: ignore[index]
    assert await status(gw, "tw_not-a-key") == 401  # authentication still answers, from memory

    own_redis.start()
    await until(lambda: _is(gw, made["key"], 200), 5.0, "recovery")
    await an.messages.create(**msg)
    no_tracebacks(caplog)
    lines = [r for r in caplog.records if r.name == "tollway.state"]
    assert refused == 30 and 2 <= len(lines) <= 4, [r.getMessage() for r in lines]


async def _is(gw: Gw, key: str, expected: int) -> bool:
    return await status(gw, key) == expected


def _watch(gw: Gw) -> Any:
    from proxy.appkeys import RESOURCES
    from proxy.statewatch import STATE_WATCH

    watch = gw.app[RESOURCES].find(STATE_WATCH)
    assert watch is not None
    return watch


async def _available(gw: Gw) -> bool:
    return bool(_watch(gw).available)


async def test_shared_cache_is_bypassed_while_redis_is_down(
    own_redis: OwnRedis, make_gateway: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cache = (
        "  - name: cache\n"
        f"    config: {{backend: state, key: '{'d' * 64}', scope: global, default_ttl: 1h}}\n"
    )
    gw = await make_gateway(CHAIN + cache, base=policy(own_redis.url, tmp_path))
    made = await make_key(gw, "erin", "pro")

    async def cache_status() -> str:
        raw = await gw.openai(made["key"]).chat.completions.with_raw_response.create(**CHAT)
        return str(raw.headers["x-tollway-cache"])

    assert [await cache_status(), await cache_status()] == ["miss", "hit"]  # Redis holds it
    own_redis.kill()
    outage = [await cache_status() for _ in range(20)]
    assert outage[-1] == "bypass" and set(outage) <= {"miss", "bypass"}  # never a 500
    own_redis.start()
    await until(lambda: _available(gw), 5.0, "recovery")
    assert [await cache_status(), await cache_status()] == ["miss", "hit"]  # an empty Redis
    no_tracebacks(caplog)
    cache_lines = [r for r in caplog.records if "response cache" in r.getMessage()]
    assert len(cache_lines) <= 2, [r.getMessage() for r in cache_lines]


async def test_an_instance_starts_while_redis_is_down(
    own_redis: OwnRedis, make_gateway: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It serves the keys of its own keys.json, and seeds Redis with them once it is back."""
    caplog.set_level(logging.INFO)
    _, key = KeyStore(tmp_path / "keys.json").create("fay", "pro")
    own_redis.kill()
    gw = await make_gateway(CHAIN, base=policy(own_redis.url, tmp_path))
    assert not _watch(gw).available
    assert await status(gw, key) == 200
    own_redis.start()
    await until(lambda: _available(gw), 5.0, "recovery")
    with own_redis.client() as r:
        assert r.hlen("tollway:keys:records") == 1
    assert quota_used(own_redis, "fay") == 1  # the request counted alone, put back
    no_tracebacks(caplog)
