"""Shipped usage rows outlive a Redis that restarts empty: a gateway keeps each shipped segment
until the meter has loaded it, and ships it again if Redis lost it before that."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import redis

from plugins.metering.database import UsageDB
from plugins.metering.stream import Meter, StreamShipper
from tests.plugins.metering.test_stream import MSG, base, chain, segment
from tests.procs import until


def kept(spool: Path) -> list[Path]:
    return sorted((spool / "shipped").glob("*.jsonl"))


def test_kept_until_loaded_and_shipped_again_after_a_flush(redis_url: str, tmp_path: Path) -> None:
    db = UsageDB(tmp_path / "meter.duckdb")
    shipper = StreamShipper(redis_url)
    spool = tmp_path / "spool"
    assert shipper.ship(segment(spool, range(1500))) == 1500  # two chunks
    assert len(kept(spool)) == 1 and shipper.settle(spool) == 0
    assert len(kept(spool)) == 1  # not loaded yet: kept
    with redis.Redis.from_url(redis_url) as r:
        r.flushall()  # Redis lost the entries before any meter loaded them
    m = Meter(db, redis_url, consumer="m1")
    assert shipper.settle(spool) == 1  # a new epoch: shipped again
    m.drain()
    assert shipper.settle(spool) == 0 and kept(spool) == []  # loaded: deleted
    assert db.query("SELECT count(*), count(DISTINCT request_id) FROM usage")[1] == [[1500, 1500]]
    # loaded, but Redis flushed before the gateway saw it loaded: shipped again, counted once
    shipper.ship(segment(spool, range(1500, 1600)))
    m.drain()
    with redis.Redis.from_url(redis_url) as r:
        r.flushall()
    shipper.ship(segment(tmp_path / "spool2", range(1600, 1700)))  # sets the new epoch
    assert shipper.settle(spool) == 1
    m.drain()
    assert shipper.settle(spool) == 0 and shipper.settle(tmp_path / "spool2") == 0
    assert kept(spool) == [] and kept(tmp_path / "spool2") == []
    assert db.query("SELECT count(*), count(DISTINCT request_id) FROM usage")[1] == [[1700, 1700]]
    assert m.loaded_rows == 1700  # the rows that came twice were counted once
    for x in (m, shipper):
        x.close()
    db.close()


async def test_a_gateway_ships_again_what_a_flushed_redis_lost(
    make_gateway: Any, redis_url: str, tmp_path: Path
) -> None:
    spool = tmp_path / "gw"
    gw = await make_gateway(chain(tmp_path / "gw.duckdb", spool), base=base(redis_url))
    key = await gw.create_key("ann")
    client = gw.openai(key)
    n = 12
    for _ in range(n):
        await client.chat.completions.create(model="gpt-5.4-mini", messages=MSG)  # type: ignore[arg-type]

    async def shipped() -> bool:  # no meter yet: everything shipped, kept
        return sum(p.read_bytes().count(b"\n") for p in kept(spool)) == n

    await until(shipped, 5.0)
    with redis.Redis.from_url(redis_url) as r:
        r.flushall()
    db = UsageDB(tmp_path / "meter.duckdb")
    m = Meter(db, redis_url, consumer="m1")
    query = "SELECT count(*), count(DISTINCT request_id) FROM usage WHERE user_id = 'ann'"

    async def loaded_and_deleted() -> bool:
        await asyncio.to_thread(m.drain)
        return bool(db.query(query)[1] == [[n, n]] and not kept(spool))

    await until(loaded_and_deleted, 5.0)
    await asyncio.sleep(0.2)  # a few more flushes: nothing shipped twice
    await asyncio.to_thread(m.drain)
    assert db.query(query)[1] == [[n, n]] and m.loaded_rows == n
    assert kept(spool) == []
    m.close()
    db.close()
