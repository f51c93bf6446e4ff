"""Many gateways, one usage database: rows through a Redis Stream into ``tollway meter``
(real redis-server, real DuckDB), none lost, none counted twice."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from plugins.metering.database import UsageDB
from plugins.metering.stream import Meter, StreamShipper
from tests.conftest import ADMIN_KEY, BASE_POLICY, Gw, policy, policy_text
from tests.plugins.metering.conftest import running_meter
from tests.procs import ROOT, TOLLWAY, Proc, fresh_interpreter, until

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MSG = [{"role": "user", "content": "meter me"}]


def base(url: str) -> dict[str, Any]:
    return policy(state={"url": url})


def chain(db: Path, spool: Path) -> str:
    return (
        "chain:\n  - name: auth\n  - name: metering\n"
        f"    config: {{sink: redis, database: {db}, spool_dir: {spool}, flush_interval: 50ms}}\n"
    )


@pytest.fixture
def url(redis_url: str) -> str:
    """This module's name for the empty Redis database each test gets."""
    return redis_url


@pytest.fixture
async def meter(url: str, tmp_path: Path) -> AsyncIterator[tuple[str, Meter]]:
    """``tollway meter``'s app and consumer thread, in this process."""
    text = policy_text(base(url), emu="http://127.0.0.1:1")
    text += chain(tmp_path / "meter.duckdb", tmp_path / "meter.spool")
    async with running_meter(text) as running:
        yield running


async def sql(gw_http: Any, site: str, query: str) -> list[list[Any]]:
    async with gw_http.post(f"{site}/admin/sql", json={"query": query}, headers=ADMIN) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["rows"]  # type: ignore[no-any-return]


async def rows_when(http: Any, site: str, query: str, expected: Any) -> None:
    """Gateways ship every 50 ms: wait up to 5 s for the meter to hold ``expected``."""
    got = None

    async def holds() -> bool:
        nonlocal got
        got = await sql(http, site, query)
        return bool(got == expected)

    try:
        await until(holds, 5.0)
    except AssertionError:
        raise AssertionError(f"{query}: {got} != {expected}") from None


async def test_two_gateways_one_meter(
    make_gateway: Any, url: str, meter: tuple[str, Meter], tmp_path: Path
) -> None:
    site, _ = meter
    gws: list[Gw] = [
        await make_gateway(chain(tmp_path / f"gw{i}.duckdb", tmp_path / f"gw{i}"), base=base(url))
        for i in (1, 2)
    ]
    keys = {"ann": await gws[0].create_key("ann"), "bob": await gws[1].create_key("bob")}
    jobs = [("ann", gws[0])] * 6 + [("bob", gws[1])] * 4
    await asyncio.gather(
        *(
            gw.openai(keys[user]).chat.completions.create(model="gpt-5.4-mini", messages=MSG)  # type: ignore[arg-type]
            for user, gw in jobs
        )
    )
    query = "SELECT user_id, count(*), count(DISTINCT request_id) FROM usage GROUP BY 1 ORDER BY 1"
    await rows_when(gws[0].http, site, query, [["ann", 6, 6], ["bob", 4, 4]])
    assert not any((tmp_path / f"gw{i}.duckdb").exists() for i in (1, 2))  # no gateway owns one
    async with gws[0].http.post(
        f"{gws[0].url}/admin/sql", json={"query": "SELECT 1"}, headers=ADMIN
    ) as r:
        assert r.status == 404 and "tollway meter" in (await r.json())["error"]["message"]
    # a deletion request travels behind the rows shipped before it
    async with gws[1].http.delete(f"{gws[1].url}/admin/users/ann/data", headers=ADMIN) as r:
        assert (await r.json())["deleted"]["usage_deletions_sent_to_meter"] == 1
    await rows_when(gws[0].http, site, query, [["bob", 4, 4]])
    async with gws[0].http.get(f"{site}/admin/invoices/bob?month=2026-11", headers=ADMIN) as r:
        assert r.status == 200 and (await r.json())["user"] == "bob"
    async with gws[0].http.post(f"{site}/admin/sql", json={"query": "SELECT 1"}) as r:
        assert r.status == 401  # the meter's admin API wants the admin key too


def segment(folder: Path, ids: range) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "000000000001.jsonl"
    path.write_text(
        "".join(
            f'{{"ts": 1764000000.0, "request_id": "req_{i}", "user_id": "u", "status": 200}}\n'
            for i in ids
        )
    )
    return path


def test_nothing_lost_nothing_doubled(url: str, tmp_path: Path) -> None:
    """A gateway killed after shipping ships the segment again; a meter killed before its
    acknowledgement reads the entry again: the rows are still there exactly once."""
    db = UsageDB(tmp_path / "meter.duckdb")
    m = Meter(db, url, consumer="m1")
    shipper = StreamShipper(url)
    seg = segment(tmp_path / "spool", range(2500))  # three chunks
    copy = tmp_path / "copy.jsonl"
    shutil.copy(seg, copy)
    assert shipper.ship(seg) == 2500 and not seg.exists()
    assert shipper.ship(copy) == 2500  # the same rows again: a crash before the delete
    entries = m._read(">", 0, 100)
    assert len(entries) == 6
    m.handle(*entries[0], ack=False)  # loaded, then the meter dies before acknowledging
    m2 = Meter(db, url, consumer="m1")  # the same meter restarted: its pending entry first
    m2.drain()
    m.drain()
    assert db.query("SELECT count(*), count(DISTINCT request_id) FROM usage")[1] == [[2500, 2500]]
    # two drains at once (a query's and the consumer thread's) on the same pending entries
    shipper.ship(segment(tmp_path / "spool2", range(5000, 9000)))
    assert len(m._read(">", 0, 100)) == 4  # read, so pending for consumer m1, not acknowledged
    workers = [threading.Thread(target=x.drain) for x in (m, m2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert db.query("SELECT count(*), count(DISTINCT request_id) FROM usage")[1] == [[6500, 6500]]
    with redis.Redis.from_url(url) as r:
        assert r.xlen("tollway:usage") == 0  # loaded entries are acknowledged and dropped
        assert r.xpending("tollway:usage", "meters")["pending"] == 0
    for x in (m, m2, shipper):
        x.close()
    db.close()


async def test_tollway_meter_command(url: str, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    text = policy_text(base(url), emu="http://127.0.0.1:1")
    policy.write_text(text + chain(tmp_path / "meter.duckdb", tmp_path / "spool"))
    shipper = StreamShipper(url)
    shipper.ship(segment(tmp_path / "spool", range(3)))
    shipper.close()
    p = Proc([*TOLLWAY, "meter", "--policy", str(policy), "--port", "0"])
    try:
        port = p.wait_for(r"listening on http://127.0.0.1:(\d+)").group(1)
        async with aiohttp.ClientSession() as http:
            rows = await sql(http, f"http://127.0.0.1:{port}", "SELECT count(*) FROM usage")
        assert rows == [[3]]
    finally:
        assert p.stop() == 0  # SIGTERM: a clean shutdown


def test_tollway_meter_refuses_a_policy_without_metering(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE_POLICY.format(admin=ADMIN_KEY, emu="http://x") + "chain: []\n")
    refused = subprocess.run(
        [*TOLLWAY, "meter", "--policy", str(bad)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert refused.returncode == 1 and "no metering plugin" in refused.stderr


def test_a_gateway_with_sink_redis_never_loads_duckdb(url: str, tmp_path: Path) -> None:
    script = (
        "import sys, asyncio\n"
        "from plugins.metering.plugin import MeteringConfig, UsageStore\n"
        f"cfg = MeteringConfig(sink='redis', database='{tmp_path}/x.duckdb')\n"
        f"store = UsageStore(cfg, '{url}')\n"
        "print('duckdb' in sys.modules, store.db is None)\n"
    )
    assert fresh_interpreter(script) == "False True"
