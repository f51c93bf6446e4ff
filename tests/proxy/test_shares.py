"""The monthly shares that quotas and budgets both count in (``proxy.shares``, ``proxy.months``,
``proxy.statedir.instance_id``): one month, one instance name and one durable record for both.
"""

from __future__ import annotations

import asyncio
import calendar
from pathlib import Path

import orjson
import redis

from plugins.budgets.ledger import Charge, MemoryLedger, RedisLedger, open_ledger
from plugins.limits.quota import RedisQuota, open_quota
from proxy.months import MonthCache, month_of, next_month_start
from proxy.shares import MonthlyCounts
from proxy.statedir import instance_id
from proxy.statewatch import StateWatch


def utc(year: int, month: int, day: int = 1, hour: int = 0) -> float:
    return float(calendar.timegm((year, month, day, hour, 0, 0)))


def test_months_turn_at_midnight_utc_and_over_the_year() -> None:
    assert month_of(utc(2025, 12, 31, 23) + 3599.5) == "2025-12"
    assert month_of(utc(2026, 1)) == "2026-01"
    assert next_month_start(utc(2025, 12, 15)) == utc(2026, 1)
    assert next_month_start(utc(2026, 2, 28, 23)) == utc(2026, 3)
    assert next_month_start(utc(2026, 3)) == utc(2026, 4)  # the first instant is the new month


def test_month_cache_recomputes_at_the_turn_and_when_the_clock_goes_back() -> None:
    cache = MonthCache()
    assert cache.current(utc(2026, 1, 31, 23)) == ("2026-01", utc(2026, 2))
    assert cache.current(utc(2026, 2)) == ("2026-02", utc(2026, 3))
    assert cache.current(utc(2025, 11, 5)) == ("2025-11", utc(2025, 12))  # set back by months


def test_instance_id_is_kept_in_the_folder(tmp_path: Path) -> None:
    name = instance_id(tmp_path / "state")
    assert name.startswith("i-") and (tmp_path / "state" / "instance-id").exists()
    assert instance_id(tmp_path / "state") == name  # a restart keeps it
    assert instance_id(None) != instance_id(None)  # no folder: a new one per process


async def test_monthly_counts_never_go_below_zero_and_keep_two_months(tmp_path: Path) -> None:
    path = tmp_path / "counts.json"
    counts = MonthlyCounts(path)
    counts.add("ann", "2026-01", 5)
    counts.add("ann", "2026-01", -7)
    assert counts.used("ann", "2026-01") == 0
    for month in ("2026-02", "2026-03"):
        counts.add("ann", month, 3)
    counts.add("bob", "2026-03")
    await counts.close()
    assert orjson.loads(path.read_bytes()) == {
        "2026-02": {"ann": 3},
        "2026-03": {"ann": 3, "bob": 1},
    }
    again = MonthlyCounts(path)  # a restart
    assert again.used("ann", "2026-03") == 3 and again.used("nobody", "2026-03") == 0
    assert await again.forget("ann") == 2
    assert await again.forget("ann") == 0


async def test_quota_and_budget_shares_of_one_folder_carry_one_name(
    tmp_path: Path, redis_url: str
) -> None:
    folder = tmp_path / "state"
    quota = open_quota(redis_url, None, folder, None)
    ledger = open_ledger(redis_url, None, folder, None)
    try:
        assert isinstance(quota, RedisQuota) and isinstance(ledger, RedisLedger)
        assert quota.instance == ledger.instance == instance_id(folder)
    finally:
        await quota.close()
        await ledger.close()


async def test_a_restarted_ledger_drops_only_its_own_reservations_and_forgets(
    tmp_path: Path, redis_url: str
) -> None:
    """A reservation field of this instance's name at start is what a crash left behind; the
    other instances' are theirs. Forgetting an account deletes its hash and says how many
    months it had."""
    with redis.Redis.from_url(redis_url) as r:
        r.hset("tollway:budget:ann", mapping={"2026-01/r/i-me": 7, "2026-01/r/i-other": 5})
        r.hset("tollway:budget:ann", mapping={"2026-01/s/i-me": 9, "2025-12/s/i-me": 4})
        r.set("tollway:budget:not-a-hash", "x")
    ledger = RedisLedger(redis_url, MemoryLedger(tmp_path / "budgets.json"), "i-me", None)
    try:
        await ledger.open()
        with redis.Redis.from_url(redis_url) as r:
            fields = r.hgetall("tollway:budget:ann")
        assert b"2026-01/r/i-me" not in fields and fields[b"2026-01/r/i-other"] == b"5"
        assert await ledger.status("ann", "2026-01") == (9, 5)
        await ledger.reserve("2026-01", [Charge("ann", 100, 3)])
        assert await ledger.status("ann", "2026-01") == (9, 8)
        assert await ledger.forget(["ann"]) == 2
        assert await ledger.status("ann", "2026-01") == (0, 0)
    finally:
        await ledger.close()


async def test_budget_spent_in_the_last_second_before_a_crash_survives_an_empty_redis(
    tmp_path: Path, redis_url: str
) -> None:
    """An instance killed after spending, before its file was written: its next process takes
    the spent share back from Redis where it is ahead of the file, so when Redis then restarts
    empty (re-seeded from the files) the money is not spent a second time."""
    folder, path, month = tmp_path / "state", tmp_path / "state" / "budgets.json", "2026-01"
    first = open_ledger(redis_url, path, folder, None)
    assert isinstance(first, RedisLedger)
    await first.open()
    charge = Charge("ann", 100, 30)
    for _ in range(2):
        assert await first.reserve(month, [charge]) == (-1, 0)
        await first.settle(month, [charge], [30])
    first.own.spent.flush()  # the file as of a second ago: 60 spent
    assert await first.reserve(month, [charge]) == (-1, 0)
    await first.settle(month, [charge], [30])  # the last second's spending, not in the file
    before = (await first.status("ann", month))[0]
    assert before == 90
    # killed: no flush, no close (only the flushing task and the connection go away)
    assert first.own.spent._task is not None
    first.own.spent._task.cancel()
    await first.client.aclose()
    assert orjson.loads(path.read_bytes()) == {month: {"ann": 60}}

    again = open_ledger(redis_url, path, folder, None)
    assert isinstance(again, RedisLedger)
    try:
        await again.open()
        with redis.Redis.from_url(redis_url) as client:
            client.flushall()  # Redis restarts empty; each instance puts its shares back
        await again.restore()
        assert (await again.status("ann", month))[0] >= before
        assert await again.reserve(month, [Charge("ann", 100, 11)]) == (0, 90)
    finally:
        await again.close()
    assert orjson.loads(path.read_bytes()) == {month: {"ann": 90}}


async def test_budget_spent_alone_while_redis_is_re_seeded_is_put_back_too(
    tmp_path: Path, redis_url: str
) -> None:
    """Re-seeding takes round trips; an instance still deciding alone meanwhile may settle
    requests after its snapshot was written. The shares are put back again until nothing
    changed under them, so Redis is complete when the state is shared again."""
    watch = StateWatch(redis_url)
    ledger = RedisLedger(redis_url, MemoryLedger(tmp_path / "budgets.json"), "i-me", watch)
    month, charge = "2026-01", Charge("ann", 1000, 10)
    try:
        await ledger.open()
        assert await ledger.reserve(month, [charge]) == (-1, 0)
        await ledger.settle(month, [charge], [10])
        watch.failed(ConnectionError("down"))  # an outage: decided alone from here
        with redis.Redis.from_url(redis_url) as client:
            client.flushall()
        putting_back = asyncio.get_running_loop().create_task(ledger.restore())
        await asyncio.sleep(0)  # the first snapshot is on its way to Redis
        assert ledger.reserve_now(month, [charge]) == (-1, 0)
        await ledger.settle(month, [charge], [10])
        await putting_back
        with redis.Redis.from_url(redis_url) as client:
            assert client.hgetall("tollway:budget:ann") == {b"2026-01/s/i-me": b"20"}
    finally:
        await ledger.close()
        await watch.client.aclose()
