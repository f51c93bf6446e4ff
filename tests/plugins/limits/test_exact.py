"""Exact limits: never more than N in any interval of a period, in memory and on Redis.

The oracle is a brute-force count over the admitted times (every interval of one period that
starts at an admission), independent of the windows' own bookkeeping. The clock is injected:
``MemoryWindows(clock)``, and on Redis the time goes into the admission script's arguments.
The property tests keep their times as integer milliseconds and give the windows seconds
(``ms / 1000``): the oracle's sums and comparisons are then exact, where float seconds would
round ``t - period`` to either side of an earlier arrival and judge the boundary wrongly.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plugins.limits.windows import (
    UNDECIDED,
    Admit,
    BoundLayers,
    FailoverWindows,
    Layer,
    MemoryWindows,
    RedisWindows,
)

EXACT = 1000  # the default exact_up_to: every limit these tests use is an exact log


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def most_in_one_period(times: list[float] | list[int], period: float) -> int:
    """The largest number of admissions in any interval [t, t + period) (brute force)."""
    return max((sum(1 for u in times if t <= u < t + period) for t in times), default=0)


def ms(seconds: float) -> int:
    """An arrival drawn as float seconds, as the property tests keep it: whole milliseconds."""
    return round(seconds * 1000)


class Driver:
    """Memory or Redis windows, driven synchronously at injected times."""

    def __init__(self, kind: str, redis_url: str | None, exact_up_to: int = EXACT) -> None:
        self.clock = Clock(0.0)
        self.loop = asyncio.new_event_loop()
        self.remote: RedisWindows | None = None
        self.memory = MemoryWindows(self.clock, exact_up_to)
        if kind == "redis":
            assert redis_url is not None
            self.remote = RedisWindows(redis_url, exact_up_to, self.clock)

    def admit(self, bound: BoundLayers, t: float) -> Admit:
        self.clock.t = t
        if self.remote is None:
            return self.memory.admit_now(bound)
        return self.loop.run_until_complete(self.remote.admit(bound))

    def close(self) -> None:
        if self.remote is not None:
            self.loop.run_until_complete(self.remote.close())
        self.loop.close()


@pytest.fixture(params=["memory", "redis"])
def driver(request: pytest.FixtureRequest) -> Iterator[Driver]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    d = Driver(request.param, url)
    yield d
    d.close()


_case = 0


def _fresh(layers: list[tuple[int, float]]) -> BoundLayers:
    """Layers with identifiers no earlier example used (the Redis database is shared)."""
    global _case
    _case += 1
    return BoundLayers([(n, p, ("user", f"case{_case}-{i}")) for i, (n, p) in enumerate(layers)])


gaps = st.lists(
    st.one_of(
        st.floats(min_value=0, max_value=0.5),
        st.floats(min_value=0, max_value=90),
        st.sampled_from([0.0, 0.001, 1.0, 59.0, 59.999, 60.0, 60.001]),
    ),
    min_size=1,
    max_size=60,
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    gaps=gaps,
    limit=st.integers(1, 8),
    period=st.sampled_from([1.0, 10.0, 60.0]),
    start=st.floats(0, 10_000),
)
def test_never_more_than_the_limit_in_any_period(
    driver: Driver, gaps: list[float], limit: int, period: float, start: float
) -> None:
    """Arbitrary arrivals: at most ``limit`` admitted in any interval of one period, a refused
    request fits after its wait, and the wait is never longer than the period."""
    bound = _fresh([(limit, period), (limit + 3, period * 2)])
    t, admitted = ms(start), []  # integer milliseconds: the oracle's arithmetic is exact
    for gap in gaps:
        t += ms(gap)
        res = driver.admit(bound, t / 1000)
        if res.failed < 0:
            admitted.append(t)
            continue
        amount, seconds, _ = bound.layers[res.failed]
        span = ms(seconds)
        assert 0 < res.wait <= seconds
        wait = res.wait * 1000  # a whole number of milliseconds here: every arrival is one
        assert wait == pytest.approx(round(wait), abs=1e-6)
        # a refusal is never needless: the layer it names was full in (t - span, t] ...
        assert sum(1 for u in admitted if u > t - span) >= amount
        # ... and stays full until just before the wait it reports: it names the exact instant
        assert sum(1 for u in admitted if u > t + round(wait) - 1 - span) >= amount
        assert sum(1 for u in admitted if u > t + round(wait) - span) < amount
    assert most_in_one_period(admitted, ms(period)) <= limit
    assert most_in_one_period(admitted, ms(period * 2)) <= limit + 3


@pytest.mark.parametrize("period", [1.0, 10.0, 60.0])
@pytest.mark.parametrize("start", [0.476, 0.1, 1234.567, 9999.999, 1_750_000_000.123456])
def test_an_arrival_exactly_one_period_later_is_admitted(
    driver: Driver, start: float, period: float
) -> None:
    """The window is (now - period, now]: at exactly one period after an admission it has
    left, in both stores. In float seconds 60.476 - 60 rounds below 0.476, which kept the first
    one and refused the second with a wait of 0."""
    bound = _fresh([(1, period)])
    later = round(start + period, 6)
    assert driver.admit(bound, start).failed == -1
    refused = driver.admit(bound, round(later - 0.000001, 6))  # a microsecond early: full
    assert refused.failed == 0 and refused.wait == pytest.approx(0.000001, abs=1e-9)
    assert driver.admit(bound, later) == Admit(-1, 0, 0, period)


def test_the_issue_example_five_per_minute(driver: Driver) -> None:
    """5 per minute: 5 requests in the last second of a minute, then one a second for two
    minutes. At most 5 in any 60 s, and Retry-After never more than 60."""
    bound = _fresh([(5, 60.0)])
    arrivals = [59.0 + i * 0.01 for i in range(5)] + [60.0 + i for i in range(120)]
    admitted = []
    for t in arrivals:
        res = driver.admit(bound, t)
        if res.failed < 0:
            admitted.append(t)
        else:
            assert 0 < math.ceil(res.wait) <= 60
    assert most_in_one_period(admitted, 60.0) == 5
    assert admitted[:5] == arrivals[:5]
    assert admitted[5] == 119.0  # the first fits as the burst's first request leaves the minute


def test_retry_after_is_exact_after_an_early_burst(driver: Driver) -> None:
    """A burst early in a minute: the 429's wait is when its first request leaves the minute
    (the counter said 71 s for a one-minute limit)."""
    bound = _fresh([(5, 60.0)])
    for i in range(5):
        assert driver.admit(bound, 1000.0 + i).failed == -1
    res = driver.admit(bound, 1010.0)
    assert res.failed == 0 and res.wait == pytest.approx(50.0)
    assert driver.admit(bound, 1060.0).failed == -1


def _layers(tag: str) -> list[Layer]:
    # the shipped shape: exact logs (minute, hour) and sliding-window counters (2000/h, 10,000/d)
    return [
        (100, 60.0, ("ip", f"{tag}-ip")),
        (2000, 3600.0, ("ip", f"{tag}-ip")),
        (60, 60.0, ("user", tag)),
        (1000, 3600.0, ("user", tag)),
        (10000, 86400.0, ("user", tag)),
        (3, 60.0, ("plan", tag)),
    ]


def test_refusals_change_no_window_in_memory() -> None:
    clock = Clock(5000.0)
    w = MemoryWindows(clock)
    bound = BoundLayers(_layers("m"))
    for _ in range(3):
        assert w.admit_now(bound).failed == -1
        clock.t += 1.5
    before = [w.used(layer) for layer in bound.layers]
    for _ in range(20):
        assert bound.layers[w.admit_now(bound).failed][2][0] == "plan"
    assert [w.used(layer) for layer in bound.layers] == before
    assert before[2] == 3 and before[4] == pytest.approx(3)


def _dump(client: redis.Redis) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in client.scan_iter("tollway:rl:*"):
        kind = client.type(key)
        out[key] = client.lrange(key, 0, -1) if kind == b"list" else client.get(key)
    return out


def _evalsha_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def test_refusals_change_no_window_on_redis_and_one_round_trip_each(redis_url: str) -> None:
    """On Redis a refused request leaves every key as it was; every admission, refused or
    not, is exactly one round trip: one EVALSHA for all six layers."""
    d = Driver("redis", redis_url)
    client = redis.Redis.from_url(redis_url)
    assert d.remote is not None
    sent: list[bytes] = []
    call = d.remote.link.call

    async def spy(command: bytes) -> Any:  # every command the windows send goes through it
        sent.append(command.split(b"\r\n")[2])  # the name: the first bulk string's value
        return await call(command)

    d.remote.link.call = spy  # type: ignore[method-assign]
    try:
        bound = BoundLayers(_layers("r"))
        assert d.admit(bound, 5000.0).failed == -1  # the first call loads the script
        for i in range(2):
            assert d.admit(bound, 5001.5 + i).failed == -1
        state = _dump(client)
        assert len(state) == 6  # four logs and two counters (this window's only)
        sent.clear()
        evalsha = _evalsha_calls(client)
        for _ in range(20):
            res = d.admit(bound, 5003.0)
            assert bound.layers[res.failed][2][0] == "plan" and 0 < res.wait <= 60
        d.clock.t = 5070.0
        ok = d.loop.run_until_complete(d.remote.admit(bound))
        assert _evalsha_calls(client) - evalsha == 21
        assert sent == [b"EVALSHA"] * 21  # nothing else went to the server
        # the numbers for the headers came back in the same trip: the plan layer (its three
        # earlier requests have left the minute), 2 left after this one
        assert (ok.failed, ok.layer, ok.remaining, ok.wait) == (-1, 5, 2, 60.0)
        after = _dump(client)
        assert all(after[key] != value for key, value in state.items())  # counted in all
    finally:
        client.close()
        d.close()


def test_refused_requests_leave_redis_unchanged(redis_url: str) -> None:
    d = Driver("redis", redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        bound = BoundLayers(_layers("u"))
        for i in range(3):
            assert d.admit(bound, 7000.0 + i).failed == -1
        state = _dump(client)
        for i in range(20):
            assert d.admit(bound, 7003.0 + i).failed == 5
        assert _dump(client) == state
    finally:
        client.close()
        d.close()


def test_script_reloads_after_script_flush(redis_url: str) -> None:
    d = Driver("redis", redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        bound = _fresh([(2, 60.0)])
        assert d.admit(bound, 10.0).failed == -1
        client.script_flush()
        assert d.admit(bound, 11.0).failed == -1
        assert d.admit(bound, 12.0).failed == 0
    finally:
        client.close()
        d.close()


def test_server_clock_when_none_is_injected(redis_url: str) -> None:
    w = RedisWindows(redis_url)
    loop = asyncio.new_event_loop()
    try:
        bound = _fresh([(2, 60.0)])
        results = [loop.run_until_complete(w.admit(bound)) for _ in range(3)]
        assert [r.failed for r in results] == [-1, -1, 0]
        assert 59 < results[2].wait <= 60
    finally:
        loop.run_until_complete(w.close())
        loop.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_counter_above_exact_up_to_stays_within_its_bound(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """A limit above ``exact_up_to`` is a sliding-window counter: the stated bound is at most
    twice the limit in any interval of one period (a full previous window at its very end,
    then the current one), and never more than the limit in one fixed window."""
    url = request.getfixturevalue("redis_url") if kind == "redis" else None
    d = Driver(kind, url, exact_up_to=0)
    try:
        bound = _fresh([(10, 60.0)])
        admitted = []
        arrivals = [59.9 + i * 0.001 for i in range(20)] + [60 + i * 0.5 for i in range(240)]
        for t in arrivals:
            if d.admit(bound, t).failed < 0:
                admitted.append(t)
        worst = most_in_one_period(admitted, 60.0)
        assert 10 < worst <= 20  # the counter overshoots, within the stated bound
        for w in range(0, 4):
            assert sum(1 for t in admitted if w * 60 <= t < (w + 1) * 60) <= 10
    finally:
        d.close()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(gaps=gaps, limit=st.integers(1, 8), start=st.floats(0, 10_000))
def test_counter_bound_holds_for_any_arrivals(
    driver: Driver, gaps: list[float], limit: int, start: float
) -> None:
    """The counter's stated bound, for arbitrary arrivals: at most the limit in any fixed
    window, so at most twice the limit in any interval of one period."""
    driver.memory.exact_up_to = 0
    if driver.remote is not None:
        driver.remote.exact_up_to = 0
    bound = _fresh([(limit, 10.0)])
    t, admitted = ms(start), []
    for gap in gaps:
        t += ms(gap)
        if driver.admit(bound, t / 1000).failed < 0:
            admitted.append(t)
    assert most_in_one_period(admitted, 10_000) <= 2 * limit
    for w in {u // 10_000 for u in admitted}:
        assert sum(1 for u in admitted if u // 10_000 == w) <= limit


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    gaps=gaps,
    limits=st.lists(st.tuples(st.integers(1, 8), st.sampled_from([1.0, 10.0, 60.0])), max_size=3),
    counted=st.lists(st.tuples(st.integers(1, 8), st.sampled_from([1.0, 10.0])), max_size=2),
    start=st.floats(0, 2e9),
    micro=st.booleans(),
)
def test_memory_and_redis_decide_alike(
    redis_url: str,
    gaps: list[float],
    limits: list[tuple[int, float]],
    counted: list[tuple[int, float]],
    start: float,
    micro: bool,
) -> None:
    """The same arrivals in process and on Redis: the same outcome, layer, remaining count and
    wait for every request, to the microsecond, for the exact logs and the counters alike
    (``micro``: arrivals anywhere on the microsecond grid, not only whole milliseconds)."""
    exact = 8  # the logs are the limits up to 8, the counters (limit + 8) above
    layers = [*limits, *((n + exact, p) for n, p in counted)] or [(1, 60.0)]
    memory, remote = Driver("memory", None, exact), Driver("redis", redis_url, exact)
    try:
        bound_m, bound_r = _fresh(layers), _fresh(layers)
        t = round(start, 6 if micro else 3)
        for gap in gaps:
            t = round(t + gap, 6 if micro else 3)
            assert memory.admit(bound_m, t) == remote.admit(bound_r, t), t
    finally:
        memory.close()
        remote.close()


async def test_gateway_one_script_call_per_request_with_the_quota(
    make_gateway: Any, redis_url: str
) -> None:
    """Through a gateway on Redis: every request, admitted or refused by the quota or a rate
    layer, is one EVALSHA (layers and quota together), and a refusal changes no key."""
    from tests.conftest import policy
    from tests.plugins.limits.test_limits import BASE, limits_chain, post

    base = policy(
        BASE,
        state={"url": redis_url},
        tiers={"free": {"requests_per_month": 3, "requests_per_minute": 100}},
    )
    gw = await make_gateway(limits_chain(user="[2/minute]", ip="[100/minute]"), base=base)
    client = redis.Redis.from_url(redis_url)
    try:
        quota_key, rate_key = await gw.create_key("q-user", "free"), await gw.create_key("r", "pro")
        evalsha = _evalsha_calls(client)
        assert [(await post(gw, quota_key)).status for _ in range(2)] == [200, 200]
        assert (await post(gw, rate_key)).status == 200
        state = _dump(client)
        refused = await post(gw, quota_key)  # the user layer (2/minute) is full
        assert refused.status == 429 and 0 < int(refused.headers["Retry-After"]) <= 60
        assert _dump(client) == state
        assert client.hgetall("tollway:quota:q-user") != {}
        quota = sum(int(v) for v in client.hgetall("tollway:quota:q-user").values())
        assert quota == 2  # the rate refusal took no place in the quota
        assert _evalsha_calls(client) - evalsha == 4
    finally:
        client.close()


async def test_gateway_quota_refusal_counts_in_no_window(make_gateway: Any, redis_url: str) -> None:
    from tests.conftest import policy
    from tests.plugins.limits.test_limits import BASE, limits_chain, post

    base = policy(
        BASE,
        state={"url": redis_url},
        tiers={"free": {"requests_per_month": 2, "requests_per_minute": 100}},
    )
    gw = await make_gateway(limits_chain(user="[50/minute]", ip="[100/minute]"), base=base)
    client = redis.Redis.from_url(redis_url)
    try:
        key = await gw.create_key("q2", "free")
        evalsha = _evalsha_calls(client)
        assert [(await post(gw, key)).status for _ in range(2)] == [200, 200]
        state = _dump(client)
        for _ in range(3):
            r = await post(gw, key)
            assert r.status == 429 and (await r.json())["error"]["code"] == "monthly_quota_exceeded"
        assert _dump(client) == state
        assert _evalsha_calls(client) - evalsha == 5
    finally:
        client.close()


async def test_quota_with_the_layers_is_undecided_when_redis_is_lost() -> None:
    """Redis fails during the admission of a request that carries the quota: nothing counted
    here, and the plugin takes the quota alone first, then admits (never the reverse order,
    which could count a request in the windows that the quota then refuses)."""
    from proxy.statewatch import StateWatch

    dead = "redis://127.0.0.1:1/0"
    watch = StateWatch(dead)
    w = FailoverWindows(RedisWindows(dead), watch)
    bound = BoundLayers([(1, 60.0, ("user", "u"))])
    res = await w.admit(bound, ("tollway:quota:u", ["2025-06/i-x", "2025-06", "5", "60"]))
    assert res.failed == UNDECIDED and not watch.available
    assert w.local.used(bound.layers[0]) == 0
    assert (await w.admit(bound)).failed == -1  # without the quota: decided alone
    assert await MemoryWindows().admit(bound, ("k", [])) == (UNDECIDED, -1, 0, 0.0, -1)
    await w.close()
    await watch.client.aclose()
