"""The meter's two readers, its consumer thread and a query's drain, share one consumer name:
a drain also gets the entries the consumer's blocking read was just given. Each entry must
still be handled once: a deletion request handled a second time, after the rows shipped
behind it were loaded, would delete those too; and ``loaded_rows`` must count each row once."""

from __future__ import annotations

import threading
from pathlib import Path

import redis

from plugins.metering.database import UsageDB
from plugins.metering.stream import Meter, StreamShipper
from tests.plugins.metering.test_stream import segment
from tests.procs import wait_for

COUNT = "SELECT count(*), count(DISTINCT request_id) FROM usage WHERE user_id = 'u'"


def test_a_drain_during_the_consumers_read_handles_each_entry_once(
    redis_url: str, tmp_path: Path
) -> None:
    db = UsageDB(tmp_path / "meter.duckdb")
    m = Meter(db, redis_url, consumer="m1")
    shipper = StreamShipper(redis_url)
    shipper.ship(segment(tmp_path / "a", range(3)))
    m.drain()
    assert db.query(COUNT)[1] == [[3, 3]]
    consumer = threading.Thread(target=m.step, kwargs={"block_ms": 20_000})
    consumer.start()
    wait_for(lambda: m._waiting, 10.0, "the consumer waits on its read")
    with redis.Redis.from_url(redis_url) as r, m._handling:  # the consumer cannot handle now
        shipper.forget("u")  # the consumer's read gets this at once...
        shipper.ship(segment(tmp_path / "b", range(3, 5)))  # ...and rows shipped after it
        wait_for(
            lambda: r.xpending("tollway:usage", "meters")["pending"] >= 1,
            10.0,
            "the consumer's read was given the deletion request",
        )
        m.drain()  # a query: handles the request, then loads the two new rows
        assert db.query(COUNT)[1] == [[2, 2]]
    consumer.join(30.0)
    assert not consumer.is_alive()
    assert db.query(COUNT)[1] == [[2, 2]]  # the consumer did not delete them again
    assert m.loaded_rows == 5
    with redis.Redis.from_url(redis_url) as r:
        assert r.xpending("tollway:usage", "meters")["pending"] == 0
        assert r.xlen("tollway:usage") == 0
    for x in (m, shipper):
        x.close()
    db.close()


def test_two_readers_at_once_count_each_row_once(redis_url: str, tmp_path: Path) -> None:
    """The consumer thread and drains in a loop over many entries: every row counted once."""
    db = UsageDB(tmp_path / "meter.duckdb")
    m = Meter(db, redis_url, consumer="m1")
    shipper = StreamShipper(redis_url)
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set():
            m.step(block_ms=50)

    def drain() -> None:
        while not stop.is_set():
            m.drain()

    threads = [threading.Thread(target=f) for f in (consume, drain, drain)]
    for t in threads:
        t.start()
    try:
        for i in range(40):  # 40 entries of 5 rows, shipped one by one while both read
            shipper.ship(segment(tmp_path / f"s{i}", range(i * 5, i * 5 + 5)))
        wait_for(lambda: db.query(COUNT)[1] == [[200, 200]], 20.0, "all rows loaded")
    finally:
        stop.set()
        for t in threads:
            t.join(30.0)
    assert m.loaded_rows == 200
    for x in (m, shipper):
        x.close()
    db.close()
