"""How far a budget can be passed when Redis is cut off from two instances that keep serving
(``state.on_unavailable: serve``), and that the first decision after it is back sees all of it.

Redis is killed and started again with its data (an append-only file written at every
command): an outage, not a loss, that each instance sees end at its own next check. While it is
down each instance decides alone from what it last heard of the others (the
others' total from its last settlement) plus its own spending, so the budget can be passed
only by what the others spend while cut off. Once Redis is back, no instance decides on it
before every instance has put back what it spent alone.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugins.budgets.ledger import NANO
from tests.conftest import GatewayFactory
from tests.plugins.budgets.test_redis_failures import ask, settled, spent_in_redis, start, watch
from tests.procs import reachable, until, wait_for
from tests.security.test_redis_restart import OwnRedis, no_tracebacks

CENT = NANO // 100  # one request; the pro budget is $0.10


class DurableRedis(OwnRedis):
    """A redis-server of this test's own that keeps its data through a SIGKILL (every write
    in its append-only file in ``folder`` before it answers)."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def start(self) -> None:
        self.folder.mkdir(exist_ok=True)
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        args += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        proc = subprocess.Popen(
            [self.binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.proc = proc
        wait_for(lambda: proc.poll() is None and reachable(self.port), 5.0, "redis-server")
        with self.client() as r:
            assert r.info("server")["process_id"] == proc.pid  # ours, not another's


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = DurableRedis(tmp_path / "redis")
    server.start()
    yield server
    if server.proc is not None:
        server.kill()


async def test_two_instances_serving_through_an_outage_pass_the_budget_by_the_others_spend(
    own_redis: OwnRedis,
    make_gateway: GatewayFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    a = await start(make_gateway, own_redis.url, tmp_path / "a")
    b = await start(make_gateway, own_redis.url, tmp_path / "b")
    key = await a.create_key("ivy", "pro")
    for i in range(4):  # a, b, a, b: $0.04, each settled before the next
        assert await ask((a, b)[i % 2], key) == 200
        await settled(own_redis, "ivy", (i + 1) / 100)
    # a last heard $0.03 in all ($0.01 of b's), b $0.04 ($0.02 of a's)

    own_redis.kill()
    assert [await ask(a, key) for _ in range(2)] == [200, 200]  # a alone: $0.05 of $0.10
    b_alone = [await ask(b, key) for _ in range(10)]
    assert all(not watch(gw).available for gw in (a, b))
    own_redis.start()  # with its data: the epoch too, so no instance takes it for a loss
    assert spent_in_redis(own_redis, "ivy") == 4 * CENT
    watch(a)._wake.set()  # a happens to check first; b at its next check, up to 200ms later
    # b: $0.02 of a's (its last settlement) + its own $0.02: six more, then refused. Without
    # the others' total from settlements it knew none of a's and took eight.
    assert b_alone == [200] * 6 + [402] * 4, b_alone
    spent = 4 + 2 + 6  # cents: $0.12, past $0.10 by what a spent while cut off ($0.02)

    # back: the first decision on Redis, by either, sees what both spent alone
    async def first_decision(gw_index: int) -> None:
        gw = (a, b)[gw_index]
        await until(lambda: watch(gw).available, 10, what="sharing again")
        assert spent_in_redis(own_redis, "ivy") == spent * CENT  # both put theirs back
        assert await ask(gw, key) == 402  # a alone believed $0.05: it would admit five

    await first_decision(0)
    await first_decision(1)
    await settled(own_redis, "ivy", spent / 100)  # nothing more was spent
    no_tracebacks(caplog)
