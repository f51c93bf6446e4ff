"""webhooks: a real receiver (an aiohttp server in the test) gets signed events from running
gateways: once per threshold, retried, after a restart, across two gateways on Redis, and
never holding up a request."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import redis
from aiohttp import web

from proxy.appkeys import RESOURCES
from proxy.statewatch import STATE_WATCH
from tests.conftest import ADMIN_KEY, Gw, policy, start_site
from tests.procs import until

SECRET = "whsec-test-0123456789"
ENV = "TOLLWAY_TEST_WEBHOOK_SECRET"
MSG = [{"role": "user", "content": "hi"}]
DOCS = Path(__file__).resolve().parents[3] / "docs" / "plugins.md"


def documented_verify() -> Callable[..., bool]:
    """The receiver's check exactly as docs/plugins.md shows it (so the docs are what is
    tested)."""
    section = DOCS.read_text().split("\n## webhooks\n", 1)[1]
    code = re.search(r"```python\n(.*?def verify\(.*?)```", section, re.S)
    assert code is not None, "docs/plugins.md#webhooks shows no verify()"
    scope: dict[str, Any] = {}
    exec(code.group(1), scope)
    return scope["verify"]  # type: ignore[no-any-return]


verify = documented_verify()


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float
    status: int = 0

    @property
    def event(self) -> dict[str, Any]:
        return orjson.loads(self.body)  # type: ignore[no-any-return]


@dataclass
class Receiver:
    """An HTTP server standing for the operator's endpoint: it records every attempt and
    answers from ``script`` (then 200), optionally after ``delay`` seconds."""

    url: str = ""
    attempts: list[Received] = field(default_factory=list)
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    delay: float = 0.0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    """Set: a delayed answer goes out at once (the test is done waiting)."""

    async def handle(self, request: web.Request) -> web.Response:
        got = Received(dict(request.headers), await request.read(), time.monotonic())
        self.attempts.append(got)
        if self.delay:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), self.delay)
        got.status, headers = self.script.pop(0) if self.script else (200, {})
        return web.Response(status=got.status, headers=headers)

    @property
    def accepted(self) -> list[Received]:
        """Attempts answered 2xx: what the receiver counts as delivered."""
        return [a for a in self.attempts if 200 <= a.status < 300]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner, url = await start_site(app)
    rec.url = f"{url}/hook"
    yield rec
    rec.release.set()
    await runner.cleanup()


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, SECRET)


def base(quota: int, **state: Any) -> dict[str, Any]:
    return policy(
        state=state or {"dir": None},
        tiers={"free": {"requests_per_month": quota, "requests_per_minute": 1000}},
    )


def chain(url: str, **config: Any) -> list[dict[str, Any]]:
    hooks = {
        "endpoints": [{"url": url, "secret": {"$env": ENV}, "kinds": ["quota.*"]}],
        "backoff": {"initial": "50ms", "max": "2s"},
        **config,
    }
    return [
        {"name": "auth"},
        {"name": "limits", "config": {}},
        {"name": "webhooks", "config": hooks},
    ]


async def ask(gw: Gw, key: str) -> int:
    """One chat request through the SDK: its status (429 once the quota is used up)."""
    try:
        await gw.openai(key).chat.completions.create(model="gpt-5.4-mini", messages=MSG)  # type: ignore[arg-type]
    except openai.RateLimitError:
        return 429
    return 200


async def stats(gw: Gw) -> dict[str, Any]:
    async with gw.http.get(
        f"{gw.url}/admin/stats", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as r:
        assert r.status == 200
        return (await r.json())["webhooks"]  # type: ignore[no-any-return]


def signed(a: Received) -> bool:
    return verify(SECRET.encode(), a.body, a.headers["Tollway-Signature"])


async def quiet(seconds: float = 0.3) -> None:
    """Time for a delivery that should not happen to show up (it goes out in milliseconds)."""
    await asyncio.sleep(seconds)


async def test_one_signed_delivery_per_threshold(make_gateway: Any, receiver: Receiver) -> None:
    gw = await make_gateway(chain(receiver.url), base=base(5))
    key = await gw.create_key("ann", "free")
    statuses = [await ask(gw, key) for _ in range(8)]
    assert statuses == [200] * 5 + [429] * 3
    await until(lambda: len(receiver.attempts) >= 2, what="two deliveries")
    await quiet()
    assert len(receiver.attempts) == 2
    events = [a.event for a in receiver.attempts]
    assert [(e["kind"], e["data"]["percent"], e["data"]["used"]) for e in events] == [
        ("quota.threshold", 80, 4),
        ("quota.threshold", 100, 5),
    ]
    for a, e in zip(receiver.attempts, events, strict=True):
        assert signed(a)
        assert a.headers["Tollway-Event-Id"] == e["id"]
        assert e["subject"] == "ann" and e["data"]["quota"] == 5 and e["data"]["plan"] == "free"
        assert set(e) == {"id", "kind", "subject", "data", "created_at"}
    # the check refuses a body that is not the one signed, and another secret
    tampered = receiver.attempts[0].body.replace(b'"used":4', b'"used":1')
    assert not verify(SECRET.encode(), tampered, receiver.attempts[0].headers["Tollway-Signature"])
    assert not verify(
        b"other", receiver.attempts[0].body, receiver.attempts[0].headers["Tollway-Signature"]
    )
    s = await stats(gw)
    assert (s["queued"], s["delivered"], s["pending"], s["failed"]) == (2, 2, 0, 0)
    assert s["endpoints"][0]["last_status"] == 200
    async with gw.http.get(f"{gw.url}/metrics") as r:
        text = await r.text()
    assert "tollway_webhook_delivered_total 2.0" in text
    assert "tollway_webhook_pending 0.0" in text


async def test_a_failing_receiver_gets_it_again_then_once(
    make_gateway: Any, receiver: Receiver
) -> None:
    # 500, then 429 asking for 1 s (longer than the backoff: it is what is waited), then 200
    receiver.script = [(500, {}), (429, {"Retry-After": "1"})]
    gw = await make_gateway(chain(receiver.url), base=base(10))
    key = await gw.create_key("bo", "free")
    for _ in range(8):
        assert await ask(gw, key) == 200
    await until(lambda: len(receiver.attempts) >= 3, within=10, what="three attempts")
    await quiet()
    attempts = receiver.attempts
    assert len(attempts) == 3
    assert [a.headers["Tollway-Delivery-Attempt"] for a in attempts] == ["1", "2", "3"]
    assert len({a.body for a in attempts}) == 1  # the same event each time
    assert len({a.headers["Tollway-Event-Id"] for a in attempts}) == 1
    assert all(signed(a) for a in attempts)
    assert attempts[2].at - attempts[1].at >= 0.9  # Retry-After honoured
    assert attempts[1].at - attempts[0].at < 0.9  # the backoff, 25-50 ms, was not
    s = await stats(gw)
    assert (s["delivered"], s["retries"], s["failed"], s["pending"]) == (1, 2, 0, 0)


async def test_given_up_after_max_attempts(make_gateway: Any, receiver: Receiver) -> None:
    receiver.script = [(500, {})] * 10
    gw = await make_gateway(chain(receiver.url, max_attempts=3), base=base(5))
    key = await gw.create_key("cy", "free")
    for _ in range(4):
        await ask(gw, key)
    await until(lambda: len(receiver.attempts) >= 3, what="three attempts")
    await until(lambda: stats(gw), what="stats")
    await quiet()
    assert len(receiver.attempts) == 3
    s = await stats(gw)
    assert (s["failed"], s["delivered"], s["pending"]) == (1, 0, 0)


async def test_owed_events_are_delivered_after_a_restart_once(
    make_gateway: Any, receiver: Receiver, tmp_path: Path
) -> None:
    receiver.script = [(503, {})] * 1000  # down for maintenance: every attempt fails
    state = tmp_path / "state"
    gw1 = await make_gateway(chain(receiver.url), base=base(5, dir=state))
    key = await gw1.create_key("di", "free")
    for _ in range(4):
        assert await ask(gw1, key) == 200
    await until(lambda: len(receiver.attempts) >= 2, what="a failed attempt and a retry")
    assert (await stats(gw1))["pending"] == 1
    await gw1.app.shutdown()
    await gw1.app.cleanup()
    assert "quota:di" not in (state / "webhooks.jsonl").read_text()  # ids, not the dedupe

    failed = len(receiver.attempts)
    assert failed >= 1 and not receiver.accepted
    receiver.script = []  # back up
    gw2 = await make_gateway(chain(receiver.url), base=base(5, dir=state))
    await until(lambda: len(receiver.accepted) >= 1, what="the owed delivery")
    assert await ask(gw2, key) == 200  # 5 of 5: the 100 % alert; 80 % is noticed again
    await until(lambda: len(receiver.accepted) >= 2, what="the 100 % delivery")
    await quiet()
    assert len(receiver.attempts) == failed + 2
    assert [a.event["data"]["percent"] for a in receiver.accepted] == [80, 100]
    assert all(signed(a) for a in receiver.attempts)
    s = await stats(gw2)
    assert (s["delivered"], s["pending"]) == (2, 0)
    await gw2.app.shutdown()
    await gw2.app.cleanup()

    # a third start: both are remembered as delivered; noticed again, they are not sent again
    gw3 = await make_gateway(chain(receiver.url), base=base(5, dir=state))
    assert await ask(gw3, key) == 429
    await quiet()
    assert len(receiver.attempts) == failed + 2
    assert (await stats(gw3))["pending"] == 0


async def test_two_gateways_on_redis_deliver_once(
    make_gateway: Any, receiver: Receiver, redis_url: str, tmp_path: Path
) -> None:
    gws = [
        await make_gateway(
            chain(receiver.url),
            base=base(10, url=redis_url, dir=tmp_path / f"gw{i}", check_interval="200ms"),
        )
        for i in range(2)
    ]
    key = await gws[0].create_key("eve", "free")
    await until(lambda: _knows(gws[1], key), what="the key on the second gateway")
    # both gateways see the user past 80 % (8 of 10), then past 100 %
    for i in range(10):
        assert await ask(gws[i % 2], key) == 200
    for g in gws:
        assert await ask(g, key) == 429
    await until(lambda: len(receiver.attempts) >= 2, what="two deliveries")
    await quiet(0.5)
    assert sorted(a.event["data"]["percent"] for a in receiver.attempts) == [80, 100]
    assert all(signed(a) for a in receiver.attempts)
    both = [await stats(g) for g in gws]
    assert sum(s["delivered"] for s in both) == 2
    assert sum(s["duplicates"] for s in both) >= 1  # the other gateway noticed one too
    assert all(s["pending"] == 0 for s in both)


async def test_claims_come_back_after_redis_loses_them(
    make_gateway: Any, receiver: Receiver, redis_url: str, tmp_path: Path
) -> None:
    """Redis restarted empty: the gateway that delivered puts its claims back, so a gateway
    noticing the same threshold afterwards loses the claim."""
    gw1 = await make_gateway(
        chain(receiver.url),
        base=base(10, url=redis_url, dir=tmp_path / "gw1", check_interval="100ms"),
    )
    key = await gw1.create_key("gil", "free")
    for _ in range(9):
        assert await ask(gw1, key) == 200
    await until(lambda: len(receiver.accepted) >= 1, what="the 80 % delivery")
    watch = gw1.app[RESOURCES].find(STATE_WATCH)
    assert watch is not None
    reseeds = watch.reseeds
    with redis.Redis.from_url(redis_url) as client:
        client.flushall()  # a restart without persistence
    await until(lambda: watch.reseeds > reseeds and watch.available, what="re-seeded")
    gw2 = await make_gateway(  # a new instance: its own (empty) state, the same Redis
        chain(receiver.url),
        base=base(10, url=redis_url, dir=tmp_path / "gw2", check_interval="100ms"),
    )
    await until(lambda: _knows(gw2, key), what="the key on the second gateway")
    assert await ask(gw2, key) == 200  # 10 of 10: it notices 80 % and 100 %
    await until(lambda: len(receiver.accepted) >= 2, what="the 100 % delivery")
    await until(lambda: _settled(gw2, 2), what="both settled on the second gateway")
    await quiet()
    assert [a.event["data"]["percent"] for a in receiver.accepted] == [80, 100]
    s = await stats(gw2)
    assert (s["delivered"], s["duplicates"]) == (1, 1)


async def _settled(gw: Gw, n: int) -> bool:
    s = await stats(gw)
    return bool(s["delivered"] + s["duplicates"] + s["failed"] >= n and s["pending"] == 0)


async def _knows(gw: Gw, key: str) -> bool:
    async with gw.http.get(f"{gw.url}/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status == 200


async def test_a_slow_receiver_does_not_slow_requests(
    make_gateway: Any, receiver: Receiver
) -> None:
    receiver.delay = 5.0
    gw = await make_gateway(chain(receiver.url), base=base(6))
    key = await gw.create_key("flo", "free")
    client = gw.openai(key)
    await client.chat.completions.create(model="gpt-5.4-mini", messages=MSG)  # type: ignore[arg-type]
    took = []
    for _ in range(5):  # 5 and 6 of 6: both thresholds crossed while the receiver sleeps
        t0 = time.monotonic()
        await client.chat.completions.create(model="gpt-5.4-mini", messages=MSG)  # type: ignore[arg-type]
        took.append(time.monotonic() - t0)
    await until(lambda: len(receiver.attempts) >= 2, what="both deliveries under way")
    assert max(took) < 1.0, took  # the receiver sleeps 5 s per delivery
    assert (await stats(gw))["delivered"] == 0  # still waiting on the receiver
    receiver.release.set()  # the receiver answers now
    await until(lambda: _settled(gw, 2), what="both delivered")
    assert (await stats(gw))["delivered"] == 2


async def test_a_reload_keeps_the_queue_and_signs_with_the_new_secret(
    make_gateway: Any, receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "policy.yaml"
    gw = await make_gateway(chain(receiver.url), base=base(5), path=path)
    key = await gw.create_key("hal", "free")
    for _ in range(4):
        assert await ask(gw, key) == 200
    await until(lambda: len(receiver.accepted) >= 1, what="the 80 % delivery")
    monkeypatch.setenv("TOLLWAY_TEST_WEBHOOK_SECRET_2", "rotated")
    path.write_text(path.read_text().replace(ENV, "TOLLWAY_TEST_WEBHOOK_SECRET_2"))
    async with gw.http.post(
        f"{gw.url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as r:
        assert r.status == 200, await r.text()
    assert await ask(gw, key) == 200  # 100 %
    await until(lambda: len(receiver.accepted) >= 2, what="the 100 % delivery")
    await quiet()
    assert len(receiver.attempts) == 2
    last = receiver.attempts[1]
    assert verify(b"rotated", last.body, last.headers["Tollway-Signature"])
    assert not signed(last)
    # one queue across the reload; the new limits instance noticed 80 % again (one duplicate:
    # a second subscriber left behind by the old chain would make it three)
    s = await stats(gw)
    assert (s["queued"], s["delivered"], s["duplicates"]) == (2, 2, 1)
