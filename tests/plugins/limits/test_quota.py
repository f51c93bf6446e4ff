"""The stores behind the limits plugin, through their interfaces (``Quota``, ``Windows``).

The plugin never asks which implementation runs: the in-process ones decide in ``take_now`` /
``admit_now`` without a coroutine, the Redis ones answer None there and decide when awaited,
and while Redis is unreachable they decide alone, synchronously again.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from plugins.limits.quota import MonthlyQuota, Quota, RedisQuota, open_quota
from plugins.limits.windows import (
    BoundLayers,
    FailoverWindows,
    MemoryWindows,
    RedisWindows,
    Windows,
    open_windows,
)
from proxy.statewatch import StateWatch

DEAD = "redis://127.0.0.1:1/0"  # nothing listens on port 1: every call is refused at once


async def test_monthly_quota_takes_refuses_and_gives_back(tmp_path: Path) -> None:
    q = MonthlyQuota(tmp_path / "quota.json")
    assert [q.take_now("ann", "2025-06", 2) for _ in range(3)] == [True, True, False]
    assert q.used("ann", "2025-06") == 2  # the refused request counted nothing
    await q.give_back("ann", "2025-06")  # refused by a later layer, or failed
    assert await q.take("ann", "2025-06", 2) is True
    assert q.take_now("ann", "2025-06", 2) is False
    assert q.take_now("bob", "2025-06", 2) is True  # per user
    assert q.take_now("ann", "2025-07", 2) is True  # per month
    await q.open()
    await q.close()  # writes what changed
    saved = orjson.loads((tmp_path / "quota.json").read_bytes())
    assert saved == {"2025-06": {"ann": 2, "bob": 1}, "2025-07": {"ann": 1}}
    assert await q.forget("ann") == 2


async def test_open_quota_chooses_once() -> None:
    assert isinstance(open_quota(None, None, None, None), MonthlyQuota)
    watch = StateWatch(DEAD)
    remote = open_quota(DEAD, None, None, watch)
    assert isinstance(remote, RedisQuota) and watch._recover == [remote.restore]
    await remote.close()
    await watch.client.aclose()


async def test_redis_quota_defers_then_decides_alone() -> None:
    watch = StateWatch(DEAD)
    q: Quota = RedisQuota(DEAD, MonthlyQuota(None), "i-test", watch)
    assert q.take_now("ann", "2025-06", 2) is None  # Redis decides: await take
    # the call fails: the outage starts, and this instance decides alone from then on
    assert await q.take("ann", "2025-06", 2) is True
    assert not watch.available
    assert q.take_now("ann", "2025-06", 2) is True
    assert q.take_now("ann", "2025-06", 2) is False  # alone, the limit still holds
    await q.give_back("ann", "2025-06")
    assert q.take_now("ann", "2025-06", 2) is True
    await q.close()
    await watch.client.aclose()


async def test_open_windows_chooses_once() -> None:
    assert isinstance(open_windows("memory://"), MemoryWindows)
    plain = open_windows(DEAD)
    assert isinstance(plain, RedisWindows)
    watch = StateWatch(DEAD)
    failover = open_windows(DEAD, watch)
    assert isinstance(failover, FailoverWindows)
    with pytest.raises(ValueError, match=r"unsupported state\.url"):
        open_windows("memcached://x")
    for w in (plain, failover):
        await w.close()
    await watch.client.aclose()


async def test_memory_windows_decide_now() -> None:
    w: Windows = MemoryWindows()
    bound = BoundLayers([(2, 60.0, ("user", "u"))])
    first = w.admit_now(bound)
    assert first is not None and first.failed == -1 and first.remaining == 1
    assert (await w.admit(bound)).failed == -1
    refused = w.admit_now(bound)
    assert refused is not None and refused.failed == 0


async def test_failover_windows_defer_then_decide_alone() -> None:
    watch = StateWatch(DEAD)
    w = FailoverWindows(RedisWindows(DEAD), watch)
    bound = BoundLayers([(1, 60.0, ("user", "u"))])
    assert w.admit_now(bound) is None  # Redis decides: await admit
    res = await w.admit(bound)  # refused connection: an outage, decided on this instance
    assert res.failed == -1 and not watch.available
    refused = w.admit_now(bound)  # synchronous while alone, and the count held
    assert refused is not None and refused.failed == 0
    await w.close()
    await watch.client.aclose()
