"""Several processes on one spool folder: each writes only its own segments, under its own lock,
and the segments of one that died are adopted by another, loaded exactly once."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import orjson
import pytest

from plugins.metering.database import UsageDB
from plugins.metering.spool import Spool
from plugins.metering.stream import Meter
from tests.conftest import free_port
from tests.procs import ROOT, TOLLWAY, Proc, running, wait_for

WRITER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from plugins.metering.spool import Spool
spool = Spool(Path({folder!r}), segment_bytes=4096)
for i in range({n}):
    spool.append({{"ts": 1764000000.0 + i, "request_id": "{name}-%d" % i, "pad": "z" * 200}})
    if i % 50 == 0:
        spool.rotate()
print("written", flush=True)
if {kill}:
    os.kill(os.getpid(), signal.SIGKILL)
spool.close()
"""


def writer(folder: Path, name: str, n: int, kill: bool = False) -> subprocess.Popen[str]:
    script = WRITER.format(root=str(ROOT), folder=str(folder), name=name, n=n, kill=kill)
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, text=True
    )


def ids_in(paths: list[Path]) -> list[str]:
    return [orjson.loads(line)["request_id"] for p in paths for line in p.read_bytes().splitlines()]


def test_two_writers_on_one_folder_keep_to_their_own_segments(tmp_path: Path) -> None:
    """Before, the second process truncated the first's mapped segment (SIGBUS)."""
    procs = [writer(tmp_path, name, 2000) for name in ("a", "b")]
    for p in procs:
        p.communicate(timeout=60)
        assert p.returncode == 0  # neither died
    segments = sorted(tmp_path.glob("*.jsonl"))
    owners = {s.name.split(".")[0] for s in segments}
    assert len(owners) == 2  # one name per process
    ids = ids_in(segments)
    assert sorted(ids) == sorted([f"a-{i}" for i in range(2000)] + [f"b-{i}" for i in range(2000)])
    # nothing loaded them here: each left them with its (now free) lock file, to be adopted
    assert {p.stem for p in tmp_path.glob("*.lock")} == owners
    third = Spool(tmp_path)
    assert sorted(third.orphan_owners()) == sorted(owners)
    third.close()


def test_a_dead_writer_is_adopted_once_and_a_live_one_never(tmp_path: Path) -> None:
    folder = tmp_path / "u.spool"  # the folder the database's sandbox lets it read
    dead = writer(folder, "dead", 300, kill=True)
    dead.communicate(timeout=60)
    assert dead.returncode == -signal.SIGKILL
    live, sibling = Spool(folder), Spool(folder)
    live.append({"ts": 1764000000.0, "request_id": "live-0"})
    live.rotate()
    live_segments = live.closed()
    [orphan] = [o for o in sibling.orphan_owners() if o != live.owner]
    assert live.owner in sibling.orphan_owners()  # listed, but alive: never adopted
    with sibling.adopt(live.owner) as segments:
        assert segments == []
    db = UsageDB(tmp_path / "u.duckdb")
    try:
        with sibling.adopt(orphan) as segments:
            assert segments
            with live.adopt(orphan) as same:  # a second adopter, at the same time: nothing
                assert same == []
            for seg in segments:
                db.ingest(seg)
        with live.adopt(orphan) as again:  # adopted once: nothing is left to adopt
            assert again == []
        assert db.query("SELECT count(*), count(DISTINCT request_id) FROM usage")[1] == [[300, 300]]
        assert live.closed() == live_segments  # the live writer's files are untouched
        assert live.oldest_ts() == 1764000000.0
    finally:
        db.close()
        live.close()
        sibling.close()
    assert orphan not in Spool(folder).orphan_owners()  # its lock file went with its rows


ADMIN = "procs-admin-key"
KEY = "tw_spool_procs_key_0123456789"
POLICY = """\
version: 1
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{key: {admin}}}
state: {{dir: null, url: "{redis}"}}
providers:
  openai: {{kind: openai, base_url: "http://127.0.0.1:{emu}/v1", api_key: k,
           retries: {{attempts: 0}}}}
models:
  gpt-5.4-mini: {{provider: openai, input_per_mtok: 0.25, output_per_mtok: 2.0}}
chain:
  - name: auth
    config:
      keys: [{{id: k1, user: u1, tier: free, sha256: {sha}}}]
  - name: metering
    config: {{sink: redis, database: {db}, spool_dir: {spool}, flush_interval: {flush}}}
"""


@pytest.fixture(scope="module")
def emulator_port() -> Iterator[int]:
    port = free_port()
    with running([*TOLLWAY, "emulator", "--port", str(port)], "emulator listening"):
        yield port


def test_two_gateways_on_one_spool_folder_and_a_kill_9(
    redis_url: str, emulator_port: int, tmp_path: Path
) -> None:
    """Two real gateways share a spool folder; one is killed with rows still spooled (a 1 h
    flush interval); its sibling adopts them; the meter holds every answered request once."""
    spool = tmp_path / "shared.spool"
    gateways: list[tuple[Proc, str]] = []
    for name, flush in (("slow", "1h"), ("fast", "100ms")):
        port = free_port()
        policy = tmp_path / f"{name}.yaml"
        policy.write_text(
            POLICY.format(
                port=port,
                admin=ADMIN,
                redis=redis_url,
                emu=emulator_port,
                sha=hashlib.sha256(KEY.encode()).hexdigest(),
                db=tmp_path / f"{name}.duckdb",
                spool=spool,
                flush=flush,
            )
        )
        proc = Proc([*TOLLWAY, "serve", "--policy", str(policy)])
        gateways.append((proc, f"http://127.0.0.1:{port}"))
    db = UsageDB(tmp_path / "meter.duckdb")
    meter = Meter(db, redis_url, consumer="test")
    answered: list[str] = []
    try:
        for proc, _ in gateways:
            proc.wait_for("tollway listening")
        clients = [
            openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) for _, url in gateways
        ]
        for i in range(60):
            raw = clients[i % 2].chat.completions.with_raw_response.create(
                model="gpt-5.4-mini",
                messages=[{"role": "user", "content": f"row {i}"}],
            )
            answered.append(raw.headers["x-request-id"])
        slow, fast = gateways[0][0], gateways[1][0]
        assert slow.popen.poll() is None and fast.popen.poll() is None  # neither died
        owners = {p.name.split(".")[0] for p in spool.glob("*.jsonl")}
        assert len(owners) == 2, owners
        slow.popen.send_signal(signal.SIGKILL)
        slow.popen.wait(10)

        def loaded() -> bool:
            meter.drain()
            return db.query("SELECT count(*) FROM usage")[1] == [[len(answered)]]

        wait_for(loaded, 15.0, fast.text)  # the fast sibling adopted the dead one's segments
        rows = db.query("SELECT request_id, count(*) FROM usage GROUP BY 1")[1]
        assert sorted(r[0] for r in rows) == sorted(answered) and {r[1] for r in rows} == {1}
        time.sleep(0.3)  # a few more flushes of the sibling: nothing is shipped twice
        meter.drain()
        assert db.query("SELECT count(*) FROM usage")[1] == [[len(answered)]]
        assert fast.popen.poll() is None
        for c in clients:
            c.close()
    finally:
        for proc, _ in gateways:
            proc.stop()
        meter.close()
        db.close()
