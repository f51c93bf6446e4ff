"""``GET /metrics`` of a real ``tollway meter`` process over a real redis-server: what it
loaded, its backlog while it catches up, the admin queries it ran, and Redis going away and
coming back, parsed with prometheus_client's own text parser."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ADMIN_KEY, free_port, policy, policy_text, redis_binary
from tests.procs import TOLLWAY, Proc, start_redis, stop_redis, until

MSG = [{"role": "user", "content": "count me"}]
BACKLOG = 200  # stream entries pushed at once: seconds of loading (a load per entry, 20 a
# step, the backlog measured at most once a second after a step), several measurements
OLD = 120.0  # seconds: how old the backlog's rows are


def chain(db: Path, spool: Path) -> str:
    return (
        "chain:\n  - name: auth\n  - name: metering\n"
        f"    config: {{sink: redis, database: {db}, spool_dir: {spool}, flush_interval: 50ms}}\n"
    )


@dataclass
class Running:
    """A ``tollway meter`` process: its URL and the Redis URL it reads."""

    url: str
    redis_url: str
    proc: Proc


def start_meter(tmp_path: Path, redis_url: str) -> Proc:
    text = policy_text(policy(state={"url": redis_url}), emu="http://127.0.0.1:1")
    file = tmp_path / "meter.yaml"
    file.write_text(text + chain(tmp_path / "meter.duckdb", tmp_path / "meter.spool"))
    return Proc([*TOLLWAY, "meter", "--policy", str(file), "--port", "0", "--name", "m"])


@pytest.fixture
def own_redis() -> Iterator[tuple[int, list[Any]]]:
    """A redis-server of this test alone (to kill and start again): its port, and a list whose
    last item is the running server."""
    port = free_port()
    servers = [start_redis(redis_binary(), port)]
    try:
        yield port, servers
    finally:
        stop_redis(servers[-1])


@pytest.fixture
async def meter(tmp_path: Path, own_redis: tuple[int, list[Any]]) -> AsyncIterator[Running]:
    url = f"redis://127.0.0.1:{own_redis[0]}/0"
    proc = start_meter(tmp_path, url)
    try:
        found = await asyncio.to_thread(proc.wait_for, r"listening on http://[\d.]+:(\d+)", 30)
        yield Running(f"http://127.0.0.1:{found.group(1)}", url, proc)
    finally:
        proc.stop()
    assert "Traceback" not in proc.text(), proc.text()


async def scrape(http: aiohttp.ClientSession, site: str) -> dict[str, float]:
    """Every sample of the meter's /metrics by name (labels other than ``le`` are not used);
    the scrape answers within a second whatever Redis does."""
    began = time.monotonic()
    async with http.get(f"{site}/metrics") as r:  # no admin key, as on a gateway
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await r.text()
    assert time.monotonic() - began < 1.0
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            le = s.labels.get("le")
            out[s.name if le is None else f"{s.name}{{le={le}}}"] = s.value
    return out


def row(n: int, ts: float) -> bytes:
    return json.dumps({"ts": ts, "request_id": f"req_{n}", "user_id": "u", "status": 200}).encode()


async def test_the_meter_exposes_rows_loaded_backlog_and_queries(
    make_gateway: Any, meter: Running, tmp_path: Path
) -> None:
    gw = await make_gateway(
        chain(tmp_path / "gw.duckdb", tmp_path / "gw.spool"),
        base=policy(state={"url": meter.redis_url}),
    )
    before = await scrape(gw.http, meter.url)
    assert before["tollway_meter_rows_loaded_total"] == 0
    assert before["tollway_meter_redis_available"] == 1
    assert before["tollway_meter_redis_unavailable_seconds"] == 0
    assert before["tollway_meter_chunk_load_seconds_count"] == 0

    # rows through a gateway with sink redis: counted once loaded, and the backlog is empty
    client = gw.openai(await gw.create_key("ann"))
    for _ in range(3):
        await client.chat.completions.create(model="gpt-5.4-mini", messages=MSG)

    async def loaded(n: int) -> bool:
        m = await scrape(gw.http, meter.url)
        return (
            m["tollway_meter_rows_loaded_total"] == n and m.get("tollway_meter_stream_entries") == 0
        )

    await until(lambda: loaded(3), 10.0)
    m = await scrape(gw.http, meter.url)
    assert m["tollway_meter_oldest_unloaded_age_seconds"] == 0
    assert m["tollway_meter_gateways_shipping"] == 1
    chunks = m["tollway_meter_chunks_loaded_total"]
    assert chunks >= 1 and m["tollway_meter_chunk_load_seconds_count"] == chunks
    assert m["tollway_meter_chunk_load_seconds_bucket{le=+Inf}"] == chunks
    assert 0 < m["tollway_meter_chunk_load_seconds_sum"] < 10
    assert m["tollway_meter_load_errors_total"] == 0
    assert m["tollway_meter_database_bytes"] > 0

    # a backlog of old rows, pushed as gateways push chunks: seen while the meter catches up,
    # as old as its rows, then gone
    old = time.time() - OLD
    with redis.Redis.from_url(meter.redis_url) as r, r.pipeline(transaction=False) as pipe:
        for n in range(BACKLOG):
            pipe.xadd("tollway:usage", {"rows": row(n, old)})
        pipe.execute()
    seen: list[tuple[float, float]] = []
    last: dict[str, float] = {}

    async def caught_up() -> bool:
        m = await scrape(gw.http, meter.url)
        last.update(m)
        entries = m["tollway_meter_stream_entries"]
        if entries:
            seen.append((entries, m["tollway_meter_oldest_unloaded_age_seconds"]))
        return m["tollway_meter_rows_loaded_total"] == 3 + BACKLOG and entries == 0

    await until(caught_up, 60.0, lambda: f"last scrape: {last}")
    assert seen, "the backlog was never seen"
    assert all(0 < entries <= BACKLOG and age >= OLD for entries, age in seen), seen
    m = await scrape(gw.http, meter.url)
    assert m["tollway_meter_oldest_unloaded_age_seconds"] == 0
    assert m["tollway_meter_chunks_loaded_total"] == chunks + BACKLOG

    # admin queries: one run, counted
    assert m["tollway_meter_admin_queries_total"] == 0
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    query = {"query": "SELECT count(*) FROM usage"}
    async with gw.http.post(f"{meter.url}/admin/sql", json=query, headers=headers) as r:
        assert r.status == 200 and (await r.json())["rows"] == [[3 + BACKLOG]]
    m = await scrape(gw.http, meter.url)
    assert m["tollway_meter_admin_queries_total"] == 1
    assert m["tollway_meter_admin_queries_stopped_total"] == 0
    assert m["tollway_meter_admin_queries_refused_total"] == 0
    assert "tollway_requests_total" not in m  # a meter serves no client requests


async def test_the_meter_says_redis_is_gone_and_back(
    meter: Running, own_redis: tuple[int, list[Any]]
) -> None:
    port, servers = own_redis
    async with aiohttp.ClientSession() as http:
        with redis.Redis(port=port) as r:
            r.xadd("tollway:usage", {"rows": row(1, time.time())})

        async def has(name: str, value: float) -> bool:
            return (await scrape(http, meter.url)).get(name) == value

        await until(lambda: has("tollway_meter_rows_loaded_total", 1), 10.0)

        servers[-1].kill()  # Redis dies: /metrics still answers at once, saying so
        await asyncio.to_thread(servers[-1].wait)
        await until(lambda: has("tollway_meter_redis_available", 0), 10.0)

        async def down_for(seconds: float) -> bool:
            m = await scrape(http, meter.url)
            assert m["tollway_meter_redis_available"] == 0
            assert "tollway_meter_stream_entries" not in m  # unknown, not a stale figure
            assert "tollway_meter_oldest_unloaded_age_seconds" not in m
            assert m["tollway_meter_rows_loaded_total"] == 1
            return m["tollway_meter_redis_unavailable_seconds"] >= seconds

        await until(lambda: down_for(1.5), 20.0)

        # Redis back (empty): the meter reaches it again and loads what arrives
        servers.append(await asyncio.to_thread(start_redis, redis_binary(), port))
        with redis.Redis(port=port) as r:
            r.xadd("tollway:usage", {"rows": row(2, time.time())})

        async def recovered() -> bool:
            m = await scrape(http, meter.url)
            return (
                m["tollway_meter_redis_available"] == 1
                and m["tollway_meter_redis_unavailable_seconds"] == 0
                and m["tollway_meter_rows_loaded_total"] == 2
                and m.get("tollway_meter_stream_entries") == 0
            )

        await until(recovered, 30.0)
