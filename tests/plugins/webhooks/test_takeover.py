"""webhooks with Redis state: what an instance owes outlives it. Real ``tollway serve``
processes on one redis-server, a real receiver (an aiohttp server in the test): one gateway
notices a threshold while the receiver is down, then is killed (SIGKILL) and its state dir
deleted, as a replaced pod loses its emptyDir; the other gateway takes the delivery over and
the receiver gets it, signed, by the same event id. With both gateways alive, nothing is taken
over and every event arrives once, however long the receiver stays down."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis
from aiohttp import web

from plugins.webhooks.claims import ATTEMPTS
from tests.conftest import Emulator, free_port, policy, policy_text, redis_binary, start_site
from tests.plugins.webhooks.test_webhooks import ENV, MSG, SECRET, Receiver, signed
from tests.procs import TOLLWAY, Proc, start_redis, stop_redis, until

pytestmark = pytest.mark.timeout(120)

ADMIN = "takeover-admin"
LEASE = 1.0  # seconds: a dead instance's deliveries are taken over this long after it died
FRESH_LEASE = 2.0  # with both alive: renewed every third of it, even on a busy test machine


def api_key(user: str) -> str:
    return f"tw_takeover_{user}_key_0123456789abcdef"


def gateway_policy(
    path: Path,
    port: int,
    state: Path,
    redis_url: str,
    emu: str,
    receiver: str,
    quota: int,
    lease: float,
) -> Path:
    users = ("ann", "bob")
    data = policy(
        listen={"host": "127.0.0.1", "port": port, "shutdown_timeout": "2s"},
        admin={"key": ADMIN},
        state={"dir": state, "url": redis_url, "check_interval": "200ms"},
        tiers={"free": {"requests_per_month": quota, "requests_per_minute": 1000}},
    )
    data["chain"] = [
        {
            "name": "auth",
            "config": {
                "keys": [
                    {
                        "id": f"k-{u}",
                        "user": u,
                        "tier": "free",
                        "sha256": hashlib.sha256(api_key(u).encode()).hexdigest(),
                    }
                    for u in users
                ]
            },
        },
        {"name": "limits", "config": {}},
        {
            "name": "webhooks",
            "config": {
                "endpoints": [{"url": receiver, "secret": {"$env": ENV}, "kinds": ["quota.*"]}],
                "backoff": {"initial": "200ms", "max": "1s"},
                "max_attempts": 100,
                "lease": f"{lease:g}s",
            },
        },
    ]
    path.write_text(policy_text(data, emu=emu))
    return path


class Cluster:
    """Two gateways (``a``, ``b``) on one Redis, each with its own state dir."""

    def __init__(
        self, tmp: Path, redis_url: str, emu: str, receiver: str, quota: int, lease: float
    ) -> None:
        self.tmp = tmp
        self.ports = {name: free_port() for name in ("a", "b")}
        self.procs: dict[str, Proc] = {}
        for name, port in self.ports.items():
            path = gateway_policy(
                tmp / f"{name}.yaml",
                port,
                self.state(name),
                redis_url,
                emu,
                receiver,
                quota,
                lease,
            )
            self.procs[name] = Proc([*TOLLWAY, "serve", "--policy", str(path)], {ENV: SECRET})
        for proc in self.procs.values():
            proc.wait_for("tollway listening", 60)

    def state(self, name: str) -> Path:
        return self.tmp / name / "state"

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    async def ask(self, name: str, user: str) -> int:
        client = openai.AsyncOpenAI(
            base_url=f"{self.url(name)}/v1", api_key=api_key(user), max_retries=0
        )
        try:
            await client.chat.completions.create(model="gpt-5.4-mini", messages=MSG)  # type: ignore[arg-type]
        except openai.RateLimitError:
            return 429
        finally:
            await client.close()
        return 200

    async def stats(self, name: str) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"{self.url(name)}/admin/stats", headers={"Authorization": f"Bearer {ADMIN}"}
            ) as r,
        ):
            assert r.status == 200
            return (await r.json())["webhooks"]  # type: ignore[no-any-return]

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait(10)
        proc.stop()

    def output(self) -> str:
        return "\n".join(f"--- {n}\n{p.tail(40)}" for n, p in self.procs.items())

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            proc.stop()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """The receiver, down for maintenance (503) until the test brings it back."""
    rec = Receiver(script=[(503, {})] * 10_000)
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner, url = await start_site(app)
    rec.url = f"{url}/hook"
    yield rec
    await runner.cleanup()


@pytest.fixture
def make_cluster(tmp_path: Path, redis_url: str, emulator: Emulator) -> Iterator[Any]:
    made: list[Cluster] = []

    def make(receiver: Receiver, quota: int, lease: float, **kw: str) -> Cluster:
        url = kw.get("redis_url", redis_url)
        made.append(Cluster(tmp_path, url, emulator.url, receiver.url, quota, lease))
        return made[-1]

    yield make
    for c in made:
        c.stop()
        assert "Traceback" not in c.output(), c.output()


def shared_outbox(redis_url: str) -> int:
    with redis.Redis.from_url(redis_url) as client:
        return int(client.hlen("tollway:webhook:owed"))


def recorded_attempts(redis_url: str) -> int:
    """The most attempts the holders have recorded for any delivery in the shared outbox."""
    with redis.Redis.from_url(redis_url) as client:
        values = client.hvals(ATTEMPTS)
    return max((int(v) for v in values), default=0)


async def watch_leases(redis_url: str, seconds: float) -> tuple[list[float], dict[str, set[str]]]:
    """Sample the shared outbox for ``seconds``: the time each lease had left at each look
    (by Redis's clock), and who held each delivery."""
    left: list[float] = []
    holders: dict[str, set[str]] = {}
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    with redis.Redis.from_url(redis_url) as client:
        while loop.time() < end:
            secs, micros = client.time()
            now = secs + micros / 1e6
            for key, score in client.zrange("tollway:webhook:due", 0, -1, withscores=True):
                left.append(score - now)
                holder = client.hget("tollway:webhook:holder", key)
                holders.setdefault(key.decode(), set()).add(holder.decode() if holder else "")
            await asyncio.sleep(0.05)
    return left, holders


async def test_a_dead_instances_delivery_is_taken_over(
    make_cluster: Any, receiver: Receiver, redis_url: str
) -> None:
    c = make_cluster(receiver, 5, LEASE)
    for _ in range(4):  # 4 of 5 on gateway a alone: the 80 % alert is a's to deliver
        assert await c.ask("a", "ann") == 200
    await until(lambda: len(receiver.attempts) >= 2, within=10, what="a failing and retrying")
    assert shared_outbox(redis_url) == 1  # mirrored in Redis, leased to a
    event_id = receiver.attempts[0].headers["Tollway-Event-Id"]
    # a's attempts reach Redis with its next renewal (every third of the lease): kill it after
    await until(lambda: recorded_attempts(redis_url) >= 1, within=LEASE + 5, what="renewal")
    c.kill("a")
    shutil.rmtree(c.state("a"))  # the pod is replaced: its state dir is gone with it
    tried_by_a = len(receiver.attempts)
    receiver.script = []  # the receiver is back
    await until(lambda: len(receiver.accepted) >= 1, within=5 * LEASE + 5, what=lambda: c.output())
    await asyncio.sleep(3 * LEASE)  # room for a second delivery that should not happen
    assert len(receiver.accepted) == 1
    got = receiver.accepted[0]
    assert got.headers["Tollway-Event-Id"] == event_id == got.event["id"]
    assert got.event["kind"] == "quota.threshold" and got.event["data"]["percent"] == 80
    assert got.event["subject"] == "ann"
    assert signed(got)
    assert all(a.body == got.body for a in receiver.attempts)  # the event as a raised it
    # b counts on from a's attempts (renewed with the lease: at most a third of it behind)
    assert int(got.headers["Tollway-Delivery-Attempt"]) > 1
    assert len(receiver.attempts) >= tried_by_a + 1
    s = await c.stats("b")
    assert (s["taken_over"], s["delivered"], s["pending"]) == (1, 1, 0)
    await until(lambda: shared_outbox(redis_url) == 0, what="the shared outbox emptied")


async def test_both_alive_each_event_once_and_nothing_taken_over(
    make_cluster: Any, receiver: Receiver, redis_url: str
) -> None:
    c = make_cluster(receiver, 10, FRESH_LEASE)
    for i in range(10):  # both gateways see ann past 80 %, then past 100 %
        assert await c.ask("ab"[i % 2], "ann") == 200
    for name in ("a", "b"):
        assert await c.ask(name, "ann") == 429
    # down for several leases: the owners keep renewing theirs, nobody takes them over
    await until(lambda: len(receiver.attempts) >= 4, within=10, what="failing attempts")
    assert shared_outbox(redis_url) == 2
    # meanwhile the leases in Redis are renewed (every third of a lease) before they run out,
    # and each delivery stays with its first holder
    left, holders = await watch_leases(redis_url, 4 * FRESH_LEASE)
    assert min(left) > 0, sorted(left)[:5]
    assert all(len(h) == 1 for h in holders.values()) and len(holders) == 2, holders
    receiver.script = []
    await until(lambda: len(receiver.accepted) >= 2, within=10, what=lambda: c.output())
    await asyncio.sleep(2 * FRESH_LEASE)
    ids = [a.headers["Tollway-Event-Id"] for a in receiver.accepted]
    assert len(ids) == 2 and len(set(ids)) == 2
    assert sorted(a.event["data"]["percent"] for a in receiver.accepted) == [80, 100]
    assert all(signed(a) for a in receiver.attempts)
    # every attempt of one event came from one instance: attempt numbers 1, 2, 3... once each
    for event in set(ids):
        numbers = [
            int(a.headers["Tollway-Delivery-Attempt"])
            for a in receiver.attempts
            if a.headers["Tollway-Event-Id"] == event
        ]
        assert numbers == list(range(1, len(numbers) + 1)), numbers
    both = [await c.stats(name) for name in ("a", "b")]
    assert sum(s["taken_over"] for s in both) == 0
    assert sum(s["delivered"] for s in both) == 2
    assert all(s["pending"] == 0 for s in both)
    await until(lambda: shared_outbox(redis_url) == 0, what="the shared outbox emptied")


async def test_an_event_raised_while_redis_is_down_survives_its_instance(
    make_cluster: Any, receiver: Receiver, tmp_path: Path
) -> None:
    """Noticed during an outage: kept in the instance's file, claimed and mirrored when Redis
    is back (restarted empty), then taken over when that instance dies."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start_redis(redis_binary(), port)
    try:
        c = make_cluster(receiver, 5, LEASE, redis_url=url)
        stop_redis(server)
        for _ in range(4):  # served with per-instance limits: a notices 80 % alone
            assert await c.ask("a", "ann") == 200
        await asyncio.sleep(1.0)
        assert not receiver.attempts  # its claim waits for Redis: never sent unclaimed
        assert (await c.stats("a"))["pending"] == 1
        server = start_redis(redis_binary(), port)
        await until(lambda: len(receiver.attempts) >= 2, within=15, what=lambda: c.output())
        assert shared_outbox(url) == 1
        event_id = receiver.attempts[0].headers["Tollway-Event-Id"]
        c.kill("a")
        shutil.rmtree(c.state("a"))
        receiver.script = []
        await until(
            lambda: len(receiver.accepted) >= 1, within=5 * LEASE + 5, what=lambda: c.output()
        )
        got = receiver.accepted[0]
        assert got.headers["Tollway-Event-Id"] == event_id and signed(got)
        assert got.event["data"]["percent"] == 80
        assert (await c.stats("b"))["taken_over"] == 1
    finally:
        stop_redis(server)
