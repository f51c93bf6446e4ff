"""Three gateways, one meter, one Redis, under load, while a gateway, the meter and Redis die.

Real processes (three ``tollway serve``, one ``tollway meter``, ``tollway emulator``, and a
redis-server of this test's own, without persistence) and the official OpenAI SDK as the
client. 200 requests arrive over a few seconds, many in flight at once, spread over the
gateways with six users on three plans; meanwhile one gateway is killed (SIGKILL) and started
again on its state dir, the meter is killed and started again, and Redis is restarted empty.
Then:

- the plans' per-minute limits held across the gateways: no user got more than the limit
  before Redis lost its windows (and a user within the limit was never refused);
- the monthly quota held across the gateways and the Redis restart: at most the quota was
  admitted, and Redis counts exactly the admitted requests (refused ones count nothing);
- the meter's database has exactly one row per answered request, with the status the client
  got: 429s and 503s included (every request the chain answers has its row), none lost with
  the killed gateway, the killed meter or the emptied Redis, none twice;
- no process printed a traceback or a prompt.

A second cluster, with the shared cache in the chain, shows the rest of what several gateways
on one Redis must hold together: a key issued through one gateway's admin API works on the
others at once, one revoked on another stops everywhere within moments; refused requests
(whichever layer refuses: the per-minute window or the monthly quota) leave every window and
the quota as the admitted requests alone make them; 30 identical requests spread over the
three gateways at 0 ms provider latency make exactly one provider call.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis

from proxy.months import month_of
from proxy.statewatch import REPORT_EVERY
from tests.conftest import free_port, redis_binary
from tests.procs import TOLLWAY, Proc, start_redis, stop_redis, until

pytestmark = pytest.mark.timeout(150)

ADMIN = "scale-admin"
# user -> (plan, requests sent): free 5/minute, pro 30/minute, capped: a quota of 12 a month
USERS = {
    "f1": ("free", 25),
    "f2": ("free", 25),
    "p1": ("pro", 45),
    "p2": ("pro", 45),
    "p3": ("pro", 30),  # exactly the plan's minute: never refused for its rate
    "c1": ("capped", 30),  # one of them sent to the gateway that is killed right after
}
PER_MINUTE = {"free": 5, "pro": 30, "capped": 1000}
QUOTA = 12
SPREAD = 5.0  # seconds over which the requests arrive

POLICY = """\
version: 1
listen: {{host: 127.0.0.1, port: {port}, shutdown_timeout: 2s}}
admin: {{key: {admin}}}
state: {{dir: {state}, url: "{redis}", on_unavailable: refuse, check_interval: 200ms}}
providers:
  openai: {{kind: openai, base_url: "http://127.0.0.1:{emu}/v1", api_key: k,
           retries: {{attempts: 0}}, timeout: {{connect: 2s, read: 10s}}}}
models:
  gpt-5.4-mini: {{provider: openai, input_per_mtok: 0.25, output_per_mtok: 2.0}}
tiers:
  free: {{requests_per_minute: 5}}
  pro: {{requests_per_minute: 30}}
  capped: {{requests_per_minute: 1000, requests_per_month: {quota}}}
  metered: {{requests_per_minute: 5, requests_per_month: 100}}
  team: {{requests_per_minute: 1000}}
chain:
  - name: auth
    config:
      keys:
{keys}
  - name: limits
{extra}  - name: metering
    config: {{sink: redis, database: {db}, spool_dir: {spool}, flush_interval: 100ms}}
"""


def api_key(user: str) -> str:
    return f"tw_scale_{user}_key_0123456789abcdef"


def write_policy(
    path: Path, port: int, redis_url: str, emu: int, folder: Path, extra: str = ""
) -> Path:
    """A gateway's (or the meter's) policy; ``extra``: chain entries between limits and
    metering."""
    keys = "\n".join(
        f"        - {{id: k-{u}, user: {u}, tier: {plan}, "
        f"sha256: {hashlib.sha256(api_key(u).encode()).hexdigest()}}}"
        for u, (plan, _) in USERS.items()
    )
    path.write_text(
        POLICY.format(
            port=port,
            admin=ADMIN,
            state=folder / "state",
            redis=redis_url,
            emu=emu,
            quota=QUOTA,
            keys=keys,
            db=folder / "usage.duckdb",
            spool=folder / "spool",
            extra=extra,
        )
    )
    return path


@dataclass
class Reply:
    """What the client got for one request (``status`` 0: no reply, the gateway died)."""

    user: str
    status: int
    gateway: str = ""
    request_id: str | None = None
    code: str | None = None
    sent: float = 0.0
    received: float = 0.0


@dataclass
class Cluster:
    """The processes of the test, by name, and what the load saw happen to them."""

    tmp: Path
    redis_port: int
    emu_port: int
    procs: dict[str, Proc] = field(default_factory=dict)
    policies: dict[str, Path] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    up: dict[str, bool] = field(default_factory=dict)
    gone: list[Proc] = field(default_factory=list)  # killed, their output kept
    redis_proc: Any = None

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start(self, name: str, args: list[str]) -> Proc:
        self.procs[name] = proc = Proc(args)
        return proc

    def gateway(self, name: str) -> Proc:
        return self.start(name, [*TOLLWAY, "serve", "--policy", str(self.policies[name])])

    def meter(self) -> Proc:
        args = ["meter", "--policy", str(self.policies["meter"]), "--port", "0", "--name", "m"]
        return self.start("meter", [*TOLLWAY, *args])

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait(10)
        proc.stop()  # reaps it and closes its output
        self.gone.append(proc)

    def output(self) -> str:
        return "\n".join(f"--- {n}\n{p.tail(40)}" for n, p in self.procs.items())

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            proc.stop(timeout=10)
        if self.redis_proc is not None:
            stop_redis(self.redis_proc)


@pytest.fixture
def chain_extra() -> str:
    """Chain entries the gateways run between limits and metering (none; a test that needs
    more, the cache, parametrizes this)."""
    return ""


@pytest.fixture
def cluster(tmp_path: Path, chain_extra: str) -> Iterator[Cluster]:
    """Redis, the emulator, the meter and three gateways, started in parallel."""
    c = Cluster(tmp_path, free_port(), free_port())
    c.redis_proc = start_redis(redis_binary(), c.redis_port)
    try:
        c.start("emulator", [*TOLLWAY, "emulator", "--port", str(c.emu_port)])
        for name in ("gw0", "gw1", "gw2", "meter"):
            c.ports[name] = free_port()
            c.policies[name] = write_policy(
                tmp_path / f"{name}.yaml",
                c.ports[name],
                c.redis_url,
                c.emu_port,
                tmp_path / name,
                "" if name == "meter" else chain_extra,
            )
        c.meter()
        for name in ("gw0", "gw1", "gw2"):
            c.gateway(name)
        c.procs["emulator"].wait_for("emulator listening", 60)
        meter_port = c.procs["meter"].wait_for(r"listening on http://127\.0\.0\.1:(\d+)", 60)
        c.ports["meter"] = int(meter_port.group(1))
        for name in ("gw0", "gw1", "gw2"):
            c.procs[name].wait_for("tollway listening", 60)
            c.up[name] = True
        yield c
    finally:
        c.stop_all()


class Load:
    """The client side: the OpenAI SDK, one client per gateway and user, no retries."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.clients: dict[tuple[str, str], openai.AsyncOpenAI] = {}
        self.replies: list[Reply] = []

    def client(self, gw: str, user: str) -> openai.AsyncOpenAI:
        if (gw, user) not in self.clients:
            self.clients[(gw, user)] = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{self.cluster.ports[gw]}/v1",
                api_key=api_key(user),
                max_retries=0,
                timeout=30,
            )
        return self.clients[(gw, user)]

    async def one(self, user: str, first: int, at: float, latency_ms: int) -> Reply:
        """One request, sent at ``at`` seconds to gateway ``first`` (or the next one that is
        up, as a load balancer would; one that refuses the connection is skipped too)."""
        await asyncio.sleep(at)
        names = ["gw0", "gw1", "gw2"]
        for gw in names[first:] + names[:first]:
            if not self.cluster.up[gw]:
                continue
            reply = Reply(user, 0, gw, sent=time.monotonic())
            try:
                raw = await self.client(gw, user).chat.completions.with_raw_response.create(
                    model="gpt-5.4-mini",
                    messages=[{"role": "user", "content": f"private-prompt-{user}"}],
                    extra_headers={"x-emulator-latency-ms": str(latency_ms)},
                )
                reply.status, reply.request_id = raw.status_code, raw.headers["x-request-id"]
            except openai.APIStatusError as e:
                reply.status = e.status_code
                reply.request_id = e.response.headers.get("x-request-id")
                reply.code = (e.body or {}).get("code") if isinstance(e.body, dict) else None
            except openai.APIConnectionError as e:
                if type(e.__cause__).__name__ == "ConnectError":  # the SDK's transport's
                    continue  # never reached that gateway: the next one takes it
                # sent, and the gateway died before it answered: no reply
            reply.received = time.monotonic()
            self.replies.append(reply)
            return reply
        raise AssertionError("no gateway up")

    async def close(self) -> None:
        for c in self.clients.values():
            await c.close()


async def meter_sql(http: aiohttp.ClientSession, cluster: Cluster, query: str) -> Any:
    url = f"http://127.0.0.1:{cluster.ports['meter']}/admin/sql"
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with http.post(url, json={"query": query}, headers=headers) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["rows"]


def reseeded(proc: Proc, since: int) -> bool:
    """Whether a gateway has noticed Redis lost its data and put its records back, in the
    output it printed after line ``since``."""
    return any("re-seeded" in line for line in proc.output[since:])


async def test_three_gateways_one_meter_through_kills_and_a_redis_restart(
    cluster: Cluster,
) -> None:
    load = Load(cluster)
    rng = random.Random(7)
    probe_sent = asyncio.Event()

    async def quota_user(at: float, first: int, latency: int) -> Reply:
        # after the one sent just before the kill, so the quota is not used up before it
        await probe_sent.wait()
        return await load.one("c1", first, at, latency)

    jobs = [(user, rng.random() * SPREAD) for user, (_, n) in USERS.items() for _ in range(n)]
    jobs.remove(next(j for j in jobs if j[0] == "c1"))  # the one sent just before the kill
    assert len(jobs) == 199
    rng.shuffle(jobs)
    tasks = [
        asyncio.create_task(
            quota_user(at * 0.8, i % 3, rng.randrange(100, 700))
            if user == "c1"
            else load.one(user, i % 3, at, rng.randrange(100, 700))
        )
        for i, (user, at) in enumerate(jobs)
    ]
    began = time.monotonic()
    redis_stopped = 0.0
    try:
        # A gateway dies with requests in flight, and starts again on its state dir. Just
        # before, it admitted a request of the quota's user: its quota file (written once a
        # second) has not counted it yet, Redis has.
        await until(lambda: len(load.replies) >= 30, 30, cluster.output)
        for _ in range(50):  # (a 503 while a slow check thinks Redis is away: again)
            probe = await load.one("c1", 1, 0, 0)
            if probe.status != 503:
                break
            await asyncio.sleep(0.05)
        assert (probe.gateway, probe.status) == ("gw1", 200), probe
        cluster.up["gw1"] = False
        await asyncio.to_thread(cluster.kill, "gw1")
        probe_sent.set()
        restarted = cluster.gateway("gw1")
        # The meter dies with entries read and not acknowledged, and starts again (before
        # Redis restarts: a meter that starts while Redis is down exits, see below).
        await until(lambda: len(load.replies) >= 60, 30, cluster.output)
        await asyncio.to_thread(cluster.kill, "meter")
        meter = cluster.meter()
        port = await asyncio.to_thread(meter.wait_for, r"listening on http://[\d.]+:(\d+)", 60)
        cluster.ports["meter"] = int(port.group(1))
        # Redis restarts empty (it keeps nothing on disk) while requests keep coming.
        await until(lambda: len(load.replies) >= 100, 30, cluster.output)
        await asyncio.to_thread(restarted.wait_for, "tollway listening", 60)
        cluster.up["gw1"] = True
        redis_stopped = time.monotonic()
        printed = {name: len(cluster.procs[name].output) for name in ("gw0", "gw1", "gw2")}
        await asyncio.to_thread(stop_redis, cluster.redis_proc)
        cluster.redis_proc = await asyncio.to_thread(
            start_redis, redis_binary(), cluster.redis_port
        )
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        # every gateway noticed and put its records (its quota shares) back
        await until(
            lambda: all(reseeded(cluster.procs[n], k) for n, k in printed.items()),
            30,
            cluster.output,
        )
    finally:
        for t in tasks:
            t.cancel()
        await load.close()
    replies = load.replies
    took = time.monotonic() - began
    assert len(replies) >= 200, took

    def of(user: str) -> list[Reply]:
        return [r for r in replies if r.user == user]

    statuses = Counter((r.status, r.code) for r in replies)
    lost = [r for r in replies if r.status == 0]
    assert {s for s, _ in statuses} <= {0, 200, 429, 503}, statuses
    assert len(lost) < 60, statuses  # only what was in flight on the killed gateway

    # -- the per-minute limits, shared by the three gateways -------------------------------
    for user, (plan, _) in USERS.items():
        limit = PER_MINUTE[plan]
        # admitted before Redis lost the windows (every reply received by then): the minute's
        # window of the old Redis; a new Redis starts an empty one, so at most twice overall
        before = [r for r in of(user) if r.status == 200 and r.received < redis_stopped]
        assert len(before) <= limit, (user, len(before))
        assert sum(r.status == 200 for r in of(user)) <= 2 * limit, user
    assert not [r for r in of("p3") if r.status == 429], "refused within the plan's minute"
    assert any(r.status == 429 and r.code != "monthly_quota_exceeded" for r in of("f1"))

    # -- the monthly quota: shared, kept across the kill and the Redis restart -------------
    capped = of("c1")
    admitted = [r for r in capped if r.status == 200]
    seen = Counter((r.status, r.code, r.gateway) for r in capped)
    assert len(admitted) <= QUOTA, f"{seen}\n{cluster.output()}"
    assert any(r.code == "monthly_quota_exceeded" for r in capped)  # it was used up
    with redis.Redis.from_url(cluster.redis_url) as client:
        shares = client.hgetall("tollway:quota:c1")
    month = month_of(time.time())
    counted = sum(int(v) for f, v in shares.items() if f.decode().startswith(month))
    # refused requests took no place; the quota was full when the last ones were refused
    assert counted == QUOTA, (counted, shares)
    in_flight = sum(r.status == 0 for r in capped)
    assert len(admitted) <= counted <= len(admitted) + in_flight

    # -- the usage record: one row per answered request, at the meter ---------------------
    want = {r.request_id: r.status for r in replies if r.status}
    assert None not in want and len(want) == len(replies) - len(lost)
    query = (
        "SELECT request_id, any_value(status), count(*), sum(cost_usd), sum(input_tokens) "
        "FROM usage GROUP BY 1"
    )
    async with aiohttp.ClientSession() as http:
        rows: list[list[Any]] = []

        async def complete() -> bool:
            nonlocal rows
            rows = await meter_sql(http, cluster, query)
            return want.keys() <= {r[0] for r in rows}

        try:
            await until(complete, 30)
        except AssertionError:
            missing = sorted(want.keys() - {r[0] for r in rows})
            raise AssertionError(
                f"{len(missing)} answered requests have no row: {missing[:5]}\n" + cluster.output()
            ) from None
        await asyncio.sleep(0.5)  # a few more flushes and loads: nothing comes twice
        rows = await meter_sql(http, cluster, query)
    by_id = {r[0]: (r[1], r[2]) for r in rows}
    wrong = [(rid, status, by_id[rid]) for rid, status in want.items() if by_id[rid] != (status, 1)]
    assert not wrong
    # a refused request (429, 503) is recorded, and costs and counts nothing
    cost = {r[0]: (float(r[3] or 0), int(r[4] or 0)) for r in rows}
    assert all(cost[rid] == (0.0, 0) for rid, status in want.items() if status != 200)
    assert all(cost[rid][0] > 0 and cost[rid][1] > 0 for rid, st in want.items() if st == 200)
    assert all(n == 1 for _, n in by_id.values())
    # rows of no answered request: only requests whose gateway died as it answered them
    assert len(by_id.keys() - want.keys()) <= len(lost)
    printed = "".join(p.text() for p in [*cluster.gone, *cluster.procs.values()])
    assert "Traceback" not in printed and "private-prompt" not in printed, printed


CACHE = (
    "  - name: cache\n"
    f"    config: {{backend: state, key: '{'c' * 64}', default_ttl: 1h}}\n"
    "  - name: batching\n"
)
GATEWAYS = ("gw0", "gw1", "gw2")
KEY_BOUND = 2.0
"""Seconds within which a key created or revoked on one gateway must be honoured by the others
(announced over Redis: milliseconds, measured; the bound is for a busy machine)."""


@dataclass
class Answer:
    """One request's outcome, as the OpenAI SDK saw it."""

    status: int
    headers: dict[str, str]
    code: str | None = None
    text: str = ""


class Clients:
    """OpenAI SDK clients by gateway and key, without retries."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.made: dict[tuple[str, str], openai.AsyncOpenAI] = {}

    def __call__(self, gw: str, key: str) -> openai.AsyncOpenAI:
        if (gw, key) not in self.made:
            self.made[(gw, key)] = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{self.cluster.ports[gw]}/v1",
                api_key=key,
                max_retries=0,
                timeout=30,
            )
        return self.made[(gw, key)]

    async def ask(self, gw: str, key: str, prompt: str = "hello") -> Answer:
        try:
            raw = await self(gw, key).chat.completions.with_raw_response.create(
                model="gpt-5.4-mini",
                messages=[{"role": "user", "content": prompt}],
                extra_headers={"x-emulator-latency-ms": "0"},
            )
        except openai.APIStatusError as e:
            code = (e.body or {}).get("code") if isinstance(e.body, dict) else None
            return Answer(e.status_code, dict(e.response.headers), code)
        text = raw.parse().choices[0].message.content or ""
        return Answer(raw.status_code, dict(raw.headers), text=text)

    async def close(self) -> None:
        for client in self.made.values():
            await client.close()


async def admin(
    http: aiohttp.ClientSession, cluster: Cluster, gw: str, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{cluster.ports[gw]}{path}"
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with http.request(method, url, json=body, headers=headers) as r:
        return r.status, await r.json()


async def known_everywhere(http: aiohttp.ClientSession, cluster: Cluster, user: str) -> None:
    """Wait until every gateway lists ``user``'s key (the admin API, so no request spends a
    place in a window)."""

    async def listed() -> bool:
        for gw in GATEWAYS:
            status, body = await admin(http, cluster, gw, "GET", f"/admin/keys?user={user}")
            assert status == 200, body
            if not body["data"]:
                return False
        return True

    await until(listed, 10, cluster.output)


async def answered_within(
    clients: Clients, gw: str, key: str, status: int, since: float, bound: float
) -> None:
    """Ask ``gw`` until it answers ``status``, at most ``bound`` seconds after ``since``
    (measured: the first request after the admin call is already answered so, ~0.2 s with
    the client's first connection)."""
    while True:
        got = (await clients.ask(gw, key)).status
        took = time.monotonic() - since
        if got == status:
            return
        assert took < bound, f"{gw} still answered {got} after {took:.3f}s"
        await asyncio.sleep(0.005)


def window_and_quota(cluster: Cluster, user: str) -> tuple[int, int]:
    """What Redis holds for ``user``: the admissions in the plan's per-minute window (an exact
    log: one entry per admitted request) and the month's quota count (every instance's share)."""
    with redis.Redis.from_url(cluster.redis_url) as client:
        windows = list(client.scan_iter(match=f"tollway:rl:*:plan:{user}"))
        assert len(windows) == 1 and client.type(windows[0]) == b"list", windows
        logged = int(client.llen(windows[0]))
        shares = client.hgetall(f"tollway:quota:{user}")
    month = month_of(time.time())
    return logged, sum(int(v) for f, v in shares.items() if f.decode().startswith(month))


async def burst(clients: Clients, key: str, n: int) -> list[Answer]:
    """``n`` requests at once, spread over the three gateways."""
    return list(await asyncio.gather(*(clients.ask(GATEWAYS[i % 3], key) for i in range(n))))


@pytest.mark.parametrize("chain_extra", [CACHE], ids=["cache"])
async def test_three_gateways_share_keys_windows_and_one_provider_call(cluster: Cluster) -> None:
    """The same cluster (with the shared cache): a key issued on one gateway works on the
    others at once and a revoked one stops everywhere within moments; a burst of refused
    requests leaves every window as the admitted requests alone make it, whichever layer
    refuses; 30 identical requests over the three gateways make one provider call."""
    clients = Clients(cluster)
    emu = f"http://127.0.0.1:{cluster.emu_port}/_emulator"
    try:
        async with aiohttp.ClientSession() as http:
            # -- a key issued on gw0 works on gw1 and gw2; revoked on gw1, it stops on all --
            status, made = await admin(
                http, cluster, "gw0", "POST", "/admin/keys", {"user": "kim", "tier": "team"}
            )
            issued = time.monotonic()
            assert status == 201, made
            for gw in ("gw1", "gw2"):
                await answered_within(clients, gw, made["key"], 200, issued, KEY_BOUND)
            status, _ = await admin(http, cluster, "gw1", "DELETE", f"/admin/keys/{made['id']}")
            revoked = time.monotonic()
            assert status == 200
            assert (await clients.ask("gw1", made["key"])).status == 401  # at once where revoked
            for gw in ("gw0", "gw2"):
                await answered_within(clients, gw, made["key"], 401, revoked, KEY_BOUND)

            # -- refused requests count in no window ---------------------------------------
            keys = {}
            for user, tier, gw in (("mia", "metered", "gw1"), ("cal", "capped", "gw2")):
                status, made = await admin(
                    http, cluster, gw, "POST", "/admin/keys", {"user": user, "tier": tier}
                )
                assert status == 201, made
                keys[user] = made["key"]
                await known_everywhere(http, cluster, user)
            # the per-minute window refuses (5 a minute): the quota counts only the admitted
            rate = await burst(clients, keys["mia"], 30)
            admitted = [a for a in rate if a.status == 200]
            assert len(admitted) == 5, Counter((a.status, a.code) for a in rate)
            assert {a.code for a in rate if a.status != 200} == {"plan_rate_limit_exceeded"}
            remaining = sorted(int(a.headers["x-ratelimit-remaining-requests"]) for a in admitted)
            assert remaining == [0, 1, 2, 3, 4]  # each admission counted once, no refusal
            assert window_and_quota(cluster, "mia") == (5, 5)
            # the quota refuses (12 a month): the per-minute window logs only the admitted
            quota = await burst(clients, keys["cal"], 30)
            admitted = [a for a in quota if a.status == 200]
            assert len(admitted) == QUOTA, Counter((a.status, a.code) for a in quota)
            assert {a.code for a in quota if a.status != 200} == {"monthly_quota_exceeded"}
            remaining = sorted(int(a.headers["x-ratelimit-remaining-requests"]) for a in admitted)
            assert remaining == list(range(1000 - QUOTA, 1000))
            assert window_and_quota(cluster, "cal") == (QUOTA, QUOTA)
            # and refused one by one, after the bursts: still nothing counted
            for gw in GATEWAYS:
                assert (await clients.ask(gw, keys["mia"])).status == 429
                assert (await clients.ask(gw, keys["cal"])).status == 429
            assert window_and_quota(cluster, "mia") == (5, 5)
            assert window_and_quota(cluster, "cal") == (QUOTA, QUOTA)

            # -- identical requests over the three gateways: one provider call -------------
            status, made = await admin(
                http, cluster, "gw0", "POST", "/admin/keys", {"user": "tia", "tier": "team"}
            )
            assert status == 201, made
            await known_everywhere(http, cluster, "tia")
            for n in range(3):
                async with http.post(f"{emu}/reset") as r:
                    assert r.status == 200
                prompt = f"secret-prompt round {n}: the same question from everywhere"
                answers = await asyncio.gather(
                    *(clients.ask(GATEWAYS[i % 3], made["key"], prompt) for i in range(30))
                )
                assert {a.status for a in answers} == {200}, [a.code for a in answers]
                async with http.get(f"{emu}/stats") as r:
                    calls = (await r.json())["requests"]
                assert calls == 1, f"round {n}: {calls} provider calls"
                assert len({a.text for a in answers}) == 1 and answers[0].text
    finally:
        await clients.close()
    printed = "".join(p.text() for p in cluster.procs.values())
    assert "Traceback" not in printed and "secret-prompt" not in printed, printed


def start_meter_without_redis(tmp_path: Path) -> tuple[Proc, str, int]:
    """A ``tollway meter`` whose Redis (a free port) is not running: (it, its URL, that port)."""
    port = free_port()
    policy = write_policy(
        tmp_path / "meter.yaml", free_port(), f"redis://127.0.0.1:{port}/0", 1, tmp_path
    )
    meter = Proc([*TOLLWAY, "meter", "--policy", str(policy), "--port", "0"])
    found = meter.wait_for(r"listening on http://[\d.]+:(\d+)", 30)
    return meter, f"http://127.0.0.1:{found.group(1)}", port


async def meter_stats(http: aiohttp.ClientSession, site: str) -> dict[str, Any]:
    async with http.get(f"{site}/admin/stats", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        assert r.status == 200, await r.text()
        return await r.json()  # type: ignore[no-any-return]


async def redis_down_for(http: aiohttp.ClientSession, site: str, seconds: float) -> None:
    """Wait until the meter's stats say Redis has been unavailable for ``seconds``."""

    async def down() -> bool:
        s = await meter_stats(http, site)
        assert s["redis"] == "unavailable" and s["stream_entries"] is None, s
        return float(s["redis_unavailable_s"]) >= seconds

    await until(down, 30)


async def test_a_meter_started_while_redis_is_down_waits_for_it(tmp_path: Path) -> None:
    """Started before Redis, the meter serves meanwhile (health; stats saying Redis is
    unavailable; 503 for a usage query), logs the outage once rather than per attempt, and once
    Redis is up makes its consumer group and loads the stream by itself (no query drains it)."""
    meter, site, port = await asyncio.to_thread(start_meter_without_redis, tmp_path)
    server = None
    headers = {"Authorization": f"Bearer {ADMIN}"}
    try:
        async with aiohttp.ClientSession() as http:
            began = time.monotonic()
            await redis_down_for(http, site, 2.0)  # several attempts: the backoff starts at 0.5 s
            async with http.get(f"{site}/healthz") as r:
                assert r.status == 200
            async with http.post(
                f"{site}/admin/sql", json={"query": "SELECT 1"}, headers=headers
            ) as r:
                assert r.status == 503, await r.text()
                assert (await r.json())["error"]["code"] == "state_unavailable"
            server = await asyncio.to_thread(start_redis, redis_binary(), port)
            down = time.monotonic() - began
            row = {"ts": time.time(), "request_id": "req_waited", "user_id": "u", "status": 200}
            with redis.Redis(port=port) as r:
                r.xadd("tollway:usage", {"rows": json.dumps(row)})

            async def loaded() -> bool:
                s = await meter_stats(http, site)
                return s["redis"] == "available" and (s["loaded_rows"], s["stream_entries"]) == (
                    1,
                    0,
                )

            await until(loaded, 30)
            with redis.Redis(port=port) as r:
                assert [g["name"] for g in r.xinfo_groups("tollway:usage")] == [b"meters"]
            async with http.post(
                f"{site}/admin/sql", json={"query": "SELECT request_id FROM usage"}, headers=headers
            ) as r:
                assert r.status == 200 and (await r.json())["rows"] == [["req_waited"]]
        text = meter.text()
        outage = [line for line in text.splitlines() if "tollway.meter: Redis" in line]
        assert 1 <= len(outage) <= 2 + down / REPORT_EVERY, text  # start, end, each 10 s
        assert "reachable again" in text and "Traceback" not in text, text
    finally:
        meter.stop()
        if server is not None:
            stop_redis(server)


async def test_a_meter_waiting_for_redis_stops_at_once_on_sigterm(tmp_path: Path) -> None:
    """SIGTERM while the meter waits out its backoff (by 3.5 s down, a wait of some 4 s): it
    exits 0 within moments, without a traceback and without waiting for Redis."""
    meter, site, _ = await asyncio.to_thread(start_meter_without_redis, tmp_path)
    try:
        async with aiohttp.ClientSession() as http:
            await redis_down_for(http, site, 3.5)
        began = time.monotonic()
        meter.terminate()
        code = await asyncio.to_thread(meter.popen.wait, 30)
        took = time.monotonic() - began
        assert code == 0 and took < 3.0, (code, took, meter.text())
        await asyncio.to_thread(meter.reader.join, 5)
        assert "Traceback" not in meter.text() and "next start" in meter.text(), meter.text()
    finally:
        meter.stop()
