"""A gateway never decides on a Redis that came back empty before its watch re-seeded it.

Redis is killed and started again empty on the same port while two gateways share a rate
limit on it. The admission connection reconnects at the next request, usually before the
watch's next check: the admission script sees that the epoch sentinel is not the one the
instance knows and decides nothing, so the request is answered as during an outage
(``state.on_unavailable``) and the watch checks, and re-seeds, at once instead of at its next
interval.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.appkeys import RESOURCES
from proxy.statewatch import STATE_WATCH, StateWatch
from tests.conftest import Gw
from tests.procs import until
from tests.security.test_redis_restart import OwnRedis, make_key, no_tracebacks, policy, status
from tests.security.test_redis_restart import own_redis as own_redis

LIMIT = 6
CHAIN = f"chain:\n  - name: auth\n  - name: limits\n    config: {{user: [{LIMIT}/minute]}}\n"


def watch(gw: Gw) -> StateWatch:
    found = gw.app[RESOURCES].find(STATE_WATCH)
    assert found is not None
    return found


@pytest.mark.parametrize("on_unavailable", ["serve", "refuse"])
async def test_a_redis_restarted_empty_decides_nothing_before_the_reseed(
    own_redis: OwnRedis,
    make_gateway: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    on_unavailable: str,
) -> None:
    caplog.set_level(logging.INFO)
    gws: list[Gw] = []
    for name in ("a", "b"):
        base = policy(own_redis.url, tmp_path / name, on_unavailable)
        base["state"]["check_interval"] = "1s"  # a wide gap before the periodic check
        gws.append(await make_gateway(CHAIN, base=base))
    alice = await make_key(gws[0], "alice", "pro")
    before = [await status(gws[i % 2], alice["key"]) for i in range(LIMIT + 2)]
    assert before == [200] * LIMIT + [429] * 2  # the limit is shared: saturated
    reseeds = [watch(gw).reseeds for gw in gws]

    own_redis.kill()
    own_redis.start()  # empty: the windows, and the epoch, are gone
    restarted = time.monotonic()
    during: list[list[int]] = [[], []]
    first_reseed: list[float] = [0.0, 0.0]

    def settling(i: int) -> bool:
        return not watch(gws[i]).available or watch(gws[i]).reseeds == reseeds[i]

    # requests through both, until either shares Redis again (after its settle time)
    while settling(0) and settling(1):
        for i, gw in enumerate(gws):
            if not settling(i):
                break
            answer = await status(gw, alice["key"])
            if settling(i):  # else it may have been decided on Redis again: not counted
                during[i].append(answer)
            if not first_reseed[i] and watch(gw).reseeds > reseeds[i]:
                first_reseed[i] = time.monotonic() - restarted
        assert time.monotonic() - restarted < 10, "no recovery"

    for statuses in during:
        # never a decision on the empty windows: the first request is answered as in an outage
        if on_unavailable == "refuse":
            assert set(statuses) == {503}, statuses
        else:  # each instance alone, on its own windows (empty: it shared them until now)
            assert statuses[0] == 200 and statuses.count(200) <= LIMIT, statuses
            assert set(statuses) <= {200, 429}, statuses
    # the changed epoch woke the watch: re-seeded at once, not at its next check (1 s)
    assert 0 < max(first_reseed) < 0.5, first_reseed
    with own_redis.client() as r:  # the keys were put back by the re-seeding
        assert r.hlen("tollway:keys:records") == 1
    await until(lambda: all(watch(gw).available for gw in gws), 5, "both sharing again")
    no_tracebacks(caplog)
    lines = [r.getMessage() for r in caplog.records if r.name == "tollway.state"]
    assert any("lost its data" in line for line in lines), lines
