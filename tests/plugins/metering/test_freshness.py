"""How fresh usage answers are (``/admin/stats``, ``X-Tollway-Fresh-As-Of`` on ``/admin/sql``),
and a meter that goes on by itself after Redis lost its data (FLUSHALL of the suite's own
redis-server, as a restart without persistence does)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis

from plugins.metering.stream import Meter
from tests.conftest import ADMIN_KEY, policy, policy_text
from tests.plugins.metering.conftest import running_meter
from tests.procs import until

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MSG = [{"role": "user", "content": "how fresh"}]
AGE = "tollway_usage_oldest_unloaded_age_seconds"


def chain(db: Path, spool: Path, sink: str, flush: str) -> str:
    return (
        "chain:\n  - name: auth\n  - name: metering\n"
        f"    config: {{sink: {sink}, database: {db}, spool_dir: {spool}, flush_interval: {flush}}}\n"
    )


async def stats(http: Any, site: str) -> dict[str, Any]:
    async with http.get(f"{site}/admin/stats", headers=ADMIN) as r:
        assert r.status == 200, await r.text()
        return await r.json()  # type: ignore[no-any-return]


async def sql(http: Any, site: str, query: str) -> tuple[float, list[list[Any]]]:
    async with http.post(f"{site}/admin/sql", json={"query": query}, headers=ADMIN) as r:
        assert r.status == 200, await r.text()
        return float(r.headers["X-Tollway-Fresh-As-Of"]), (await r.json())["rows"]


async def test_a_gateway_says_how_old_its_unloaded_rows_are(
    make_gateway: Any, tmp_path: Path
) -> None:
    gw = await make_gateway(chain(tmp_path / "u.duckdb", tmp_path / "u.spool", "duckdb", "1h"))
    key = await gw.create_key("ann")
    assert (await stats(gw.http, gw.url))["plugins"][AGE] == 0  # nothing waiting
    before = time.time()
    await gw.openai(key).chat.completions.create(model="gpt-5.4-mini", messages=MSG)
    await asyncio.sleep(0.05)
    age = (await stats(gw.http, gw.url))["plugins"][AGE]
    assert 0.05 <= age < time.time() - before + 1  # the row waits in the spool (1 h flush)
    fresh, rows = await sql(gw.http, gw.url, "SELECT count(*) FROM usage")
    assert rows == [[1]] and before < fresh <= time.time()
    assert (await stats(gw.http, gw.url))["plugins"][AGE] == 0  # the query loaded it


@pytest.fixture
async def meter(redis_url: str, tmp_path: Path) -> AsyncIterator[tuple[str, Meter]]:
    text = policy_text(policy(state={"url": redis_url}), emu="http://127.0.0.1:1")
    text += chain(tmp_path / "meter.duckdb", tmp_path / "meter.spool", "redis", "50ms")
    async with running_meter(text) as running:
        yield running


async def test_the_meter_says_how_fresh_and_survives_a_flushall(
    make_gateway: Any,
    redis_url: str,
    meter: tuple[str, Meter],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    site, _ = meter
    gw = await make_gateway(
        chain(tmp_path / "gw.duckdb", tmp_path / "gw.spool", "redis", "50ms"),
        base=policy(state={"url": redis_url}),
    )
    key = await gw.create_key("ann")
    client = gw.openai(key)
    query = "SELECT count(*), count(DISTINCT request_id) FROM usage"

    async def count_is(n: int) -> bool:
        return (await sql(gw.http, site, query))[1] == [[n, n]]

    before = time.time()
    for _ in range(3):
        await client.chat.completions.create(model="gpt-5.4-mini", messages=MSG)
    await until(lambda: count_is(3), 5.0)
    fresh, _ = await sql(gw.http, site, query)
    assert before < fresh <= time.time()  # every gateway's rows up to then are in
    s = await stats(gw.http, site)
    assert s["stream_entries"] == 0 and s["oldest_unloaded_age_s"] is None
    assert s["gateways_shipping"] == 1 and s["loaded_rows"] == 3
    assert s["time"] - s["fresh_as_of"] < 2.0

    # Redis loses everything: the stream, the meter's group, the gateways' marks
    with caplog.at_level(logging.WARNING), redis.Redis.from_url(redis_url) as r:
        r.flushall()
        await asyncio.sleep(0.3)  # the consumer blocks on the stream meanwhile
        for _ in range(2):
            await client.chat.completions.create(model="gpt-5.4-mini", messages=MSG)
        await until(lambda: count_is(5), 10.0)  # rows shipped after the flush are loaded
        await asyncio.sleep(0.3)
        assert await count_is(5)  # and none of the earlier three came twice
        assert r.xpending("tollway:usage", "meters")["pending"] == 0
    assert not [rec for rec in caplog.records if rec.exc_info], "no traceback for a flush"
    fresh, _ = await sql(gw.http, site, query)
    assert fresh > before
