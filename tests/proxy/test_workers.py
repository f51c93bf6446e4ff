"""``tollway serve --workers N``: N real worker processes on one port, sharing state in the
suite's Redis; limits stay exact across them, a killed worker is started again, SIGHUP and
SIGTERM reach every worker, and a policy that cannot be shared is refused at start."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from plugins.metering.database import UsageDB
from plugins.metering.stream import Meter
from tests.conftest import free_port
from tests.procs import ROOT, TOLLWAY, Proc, running, wait_for

FREE = "tw_workers_free_key_0123456789"
PRO = "tw_workers_pro_key_01234567890"
CAPPED = "tw_workers_capped_key_012345678"
QUOTA = 20  # the capped plan's requests a month
POLICY = """\
version: 1
listen: {{host: 127.0.0.1, port: {port}, shutdown_timeout: 2s}}
admin: {{key: workers-admin}}
state: {{dir: {state}, url: "{redis}"}}
providers:
  openai: {{kind: openai, base_url: "http://127.0.0.1:{emu}/v1", api_key: k,
           retries: {{attempts: 0}}}}
models:
  gpt-5.4-mini: {{provider: openai}}
tiers:
  free: {{requests_per_minute: 5}}
  pro: {{requests_per_minute: 1000}}
  capped: {{requests_per_minute: 1000, requests_per_month: {quota}}}
chain:
  - name: auth
    config:
      keys:
        - {{id: k1, user: u1, tier: free, sha256: {free}}}
        - {{id: k2, user: u2, tier: pro, sha256: {pro}}}
        - {{id: k3, user: u3, tier: capped, sha256: {capped}}}
  - name: limits
  - name: metering
    config: {{sink: {sink}, database: {db}, flush_interval: {flush}}}
"""


@pytest.fixture(scope="module")
def emulator_port() -> Iterator[int]:
    port = free_port()
    with running([*TOLLWAY, "emulator", "--port", str(port)], "emulator listening"):
        yield port


def write_policy(
    tmp_path: Path, port: int, redis: str, emu: int, sink: str = "redis", flush: str = "100ms"
) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(
        POLICY.format(
            port=port,
            state=tmp_path / "state",
            redis=redis,
            emu=emu,
            free=hashlib.sha256(FREE.encode()).hexdigest(),
            pro=hashlib.sha256(PRO.encode()).hexdigest(),
            capped=hashlib.sha256(CAPPED.encode()).hexdigest(),
            quota=QUOTA,
            sink=sink,
            flush=flush,
            db=tmp_path / "usage.duckdb",
        )
    )
    return path


def ask(port: int, key: str) -> tuple[int, str]:
    """One request on a connection of its own (so the kernel may give it to any worker)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        body = {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "hi"}]}
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps(body),
            {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        r = conn.getresponse()
        r.read()
        return r.status, r.getheader("x-request-id") or ""
    finally:
        conn.close()


def workers_of(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sorted(int(c) for c in children)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_two_workers_exact_limits_restart_and_shutdown(
    redis_url: str, emulator_port: int, tmp_path: Path
) -> None:
    port = free_port()
    policy = write_policy(tmp_path, port, redis_url, emulator_port)
    gw = Proc([*TOLLWAY, "serve", "--policy", str(policy), "--workers", "2"])
    db = UsageDB(tmp_path / "meter.duckdb")
    meter = Meter(db, redis_url, consumer="test")
    try:
        gw.wait_for(rf"tollway listening on http://127\.0\.0\.1:{port}$", 60)
        assert gw.text().count("tollway listening") == 1  # the parent's line alone
        first = workers_of(gw.pid)
        assert len(first) == 2
        # each worker keeps its own embedded files: one writer per file
        assert sorted(p.name for p in (tmp_path / "state").glob("worker-*")) == [
            "worker-0",
            "worker-1",
        ]

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: ask(port, FREE), range(20)))
        statuses = sorted(s for s, _ in answers)
        assert statuses == [200] * 5 + [429] * 15, statuses  # exactly the plan's 5 a minute
        answered = [rid for _, rid in answers]  # a refused request has its usage row too
        # the monthly quota, exact too: 40 at once, on 40 connections the kernel spreads over
        # both workers, and each worker's share of the count is its own field in Redis
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: ask(port, CAPPED), range(2 * QUOTA)))
        statuses = sorted(s for s, _ in answers)
        assert statuses == [200] * QUOTA + [429] * QUOTA, statuses
        answered += [rid for _, rid in answers]
        with redis.Redis.from_url(redis_url) as client:
            shares = client.hgetall("tollway:quota:u3")
        assert sum(int(v) for v in shares.values()) == QUOTA  # refused ones counted nothing
        assert len(shares) == 2, shares  # both workers admitted some

        gw.popen.send_signal(signal.SIGHUP)  # reaches every worker
        wait_for(lambda: gw.text().splitlines().count("policy reloaded") == 2, 30, gw.text)

        victim = first[0]
        os.kill(victim, signal.SIGKILL)
        gw.wait_for(r"worker \d \(pid \d+\) is serving again", 60)
        assert "exited with signal 9" in gw.text()
        now = workers_of(gw.pid)
        assert len(now) == 2 and victim not in now and first[1] in now
        with ThreadPoolExecutor(10) as pool:
            after = list(pool.map(lambda _: ask(port, PRO), range(20)))
        assert [s for s, _ in after] == [200] * 20
        answered += [rid for _, rid in after]

        assert all(answered)

        def loaded() -> bool:  # usage of both workers, the killed one's included, once each
            meter.drain()
            return db.query("SELECT count(*) FROM usage")[1] == [[len(answered)]]

        wait_for(loaded, 20.0, gw.text)
        rows = db.query("SELECT request_id, count(*) FROM usage GROUP BY 1")[1]
        assert sorted(r[0] for r in rows) == sorted(answered) and {r[1] for r in rows} == {1}

        began = time.monotonic()
        gw.popen.send_signal(signal.SIGTERM)
        assert gw.popen.wait(2 * 2 + 10) == 0
        assert time.monotonic() - began < 2 * 2 + 10
        assert not any(alive(p) for p in now)
    finally:
        gw.stop()
        meter.close()
        db.close()


def spooled_rows(spool: Path, pid: int) -> int:
    """Rows in the spool segments of the process ``pid`` (named ``HOST-PID-STARTMS.N.jsonl``;
    a segment's unused tail is zeros)."""
    return sum(p.read_bytes().count(b"\n") for p in spool.glob(f"*-{pid}-*.jsonl"))


def test_the_rows_of_a_killed_worker_are_not_lost(
    redis_url: str, emulator_port: int, tmp_path: Path
) -> None:
    """A worker killed (SIGKILL) with rows in its spool it had not shipped yet: its successor
    (or its sibling) adopts its segments and ships them, so the meter gets every answered
    request once."""
    port = free_port()
    # no flush while the test runs: the answered requests' rows stay in the workers' spools
    policy = write_policy(tmp_path, port, redis_url, emulator_port, flush="60s")
    gw = Proc([*TOLLWAY, "serve", "--policy", str(policy), "--workers", "2"])
    db = UsageDB(tmp_path / "meter.duckdb")
    meter = Meter(db, redis_url, consumer="test")
    try:
        gw.wait_for(rf"tollway listening on http://127\.0\.0\.1:{port}$", 60)
        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(lambda _: ask(port, PRO), range(40)))
        assert [s for s, _ in answers] == [200] * 40
        victim = workers_of(gw.pid)[0]
        spool = tmp_path / "usage.spool"
        held = spooled_rows(spool, victim)
        assert held > 0  # (40 connections, two workers: each answered some)
        os.kill(victim, signal.SIGKILL)
        gw.wait_for(r"worker \d \(pid \d+\) is serving again", 60)
        gw.popen.send_signal(signal.SIGTERM)  # the live ones ship what they hold as they stop
        assert gw.popen.wait(20) == 0
        assert spooled_rows(spool, victim) == 0  # adopted: shipped, none left behind
        meter.drain()
        rows = db.query("SELECT request_id, count(*) FROM usage GROUP BY 1")[1]
        assert sorted(r[0] for r in rows) == sorted(rid for _, rid in answers)
        assert {r[1] for r in rows} == {1}
    finally:
        gw.stop()
        meter.close()
        db.close()


def serve_workers(policy: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TOLLWAY, "serve", "--policy", str(policy), "--workers", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_workers_need_shared_state(emulator_port: int, tmp_path: Path) -> None:
    policy = write_policy(tmp_path, free_port(), "memory://", emulator_port, sink="duckdb")
    done = serve_workers(policy)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "tollway: --workers 2 needs shared state: set state.url: redis://HOST:PORT/DB in the "
        "policy (with memory state each worker would keep its own keys, limits, quotas and "
        "cache)"
    )
    assert not (tmp_path / "state" / "tollway.lock").exists()  # refused before anything


def test_workers_need_the_redis_sink(redis_url: str, emulator_port: int, tmp_path: Path) -> None:
    policy = write_policy(tmp_path, free_port(), redis_url, emulator_port, sink="duckdb")
    done = serve_workers(policy)
    assert done.returncode == 1
    assert "--workers 2 with metering needs metering.sink: redis" in done.stderr


def test_a_killed_parent_takes_its_workers_with_it(
    redis_url: str, emulator_port: int, tmp_path: Path
) -> None:
    port = free_port()
    policy = write_policy(tmp_path, port, redis_url, emulator_port)
    gw = Proc([*TOLLWAY, "serve", "--policy", str(policy), "--workers", "2"])
    try:
        gw.wait_for("tollway listening", 60)
        workers = workers_of(gw.pid)
        gw.popen.send_signal(signal.SIGKILL)
        gw.popen.wait(10)
        wait_for(lambda: not any(alive(p) for p in workers), 15.0, "workers ended")
    finally:
        gw.stop()
