"""The in-process windows (exact logs, sliding-window counters): counts and Retry-After."""

from __future__ import annotations

import limits
import pytest

from plugins.limits.windows import BoundLayers, MemoryWindows


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(("limit", "start"), [(5, 1000.0), (5, 1000.7), (60, 6000.3), (1, 50.9)])
async def test_reset_time_is_when_the_next_request_fits(limit: int, start: float) -> None:
    clock = Clock(start)
    w = MemoryWindows(clock)
    item = limits.RateLimitItemPerSecond(limit, 10)
    for _ in range(limit):
        assert await w.hit(item, "u")
    assert not await w.hit(item, "u")
    stats = await w.get_window_stats(item, "u")
    assert stats.remaining == 0
    clock.t = stats.reset_time - 0.01
    assert not await w.test(item, "u")
    clock.t = stats.reset_time + 0.001
    assert await w.test(item, "u")
    assert stats.reset_time - start <= 20  # never more than two windows


async def test_keys_and_items_are_independent() -> None:
    w = MemoryWindows(Clock(100.0))
    a = limits.RateLimitItemPerSecond(2, 10)
    b = limits.RateLimitItemPerSecond(3, 10)
    assert [await w.hit(a, "u1") for _ in range(3)] == [True, True, False]
    assert [await w.hit(a, "u2") for _ in range(3)] == [True, True, False]
    assert [await w.hit(b, "u1") for _ in range(4)] == [True, True, True, False]


async def test_cost_and_stale_keys_are_swept() -> None:
    clock = Clock(0.0)
    w = MemoryWindows(clock)
    w.SWEEP_EVERY = 3
    item = limits.RateLimitItemPerSecond(10, 1)
    assert await w.hit(item, "a", cost=7)
    assert not await w.hit(item, "a", cost=4)
    assert (await w.get_window_stats(item, "a")).remaining == 3
    await w.hit(item, "b")
    clock.t = 100.0
    await w.hit(item, "c")  # the third new key triggers a sweep of a and b
    assert len(w) == 1


async def test_admit_consumes_nothing_on_refusal_and_reports_tightest_layer() -> None:
    w = MemoryWindows(Clock(500.0))
    layers = [(10, 60.0, ("ip", "1.2.3.4")), (2, 60.0, ("user", "u")), (5, 60.0, ("plan", "u"))]
    bound = BoundLayers(layers)
    first = w.admit_now(bound)
    assert first.failed == -1 and first.layer == 1 and first.remaining == 1
    assert w.admit_now(bound).failed == -1
    refused = w.admit_now(bound)
    assert refused.failed == 1 and refused.wait > 0
    # the refused request counted nowhere: the ip layer saw exactly two requests
    other_user = [(10, 60.0, ("ip", "1.2.3.4")), (2, 60.0, ("user", "v"))]
    res = w.admit_now(BoundLayers(other_user))
    assert res.failed == -1 and res.layer == 1 and res.remaining == 1
    ip_only = w.admit_now(BoundLayers([(10, 60.0, ("ip", "1.2.3.4"))]))
    assert ip_only.remaining == 10 - 4


@pytest.mark.parametrize("exact", [0, 1000])
async def test_bound_layers_follow_a_sweep(exact: int) -> None:
    """A caller's resolved counters must not outlive a sweep: after one, the caller and a new
    caller sharing a layer (same IP) count in the same counter, not in an orphaned copy."""
    clock = Clock(0.0)
    w = MemoryWindows(clock, exact_up_to=exact)
    w.SWEEP_EVERY = 2
    ip = (3, 10.0, ("ip", "9.9.9.9"))
    alice = BoundLayers([ip, (100, 10.0, ("user", "alice"))])
    assert w.admit_now(alice).failed == -1
    clock.t = 100.0  # both windows of every key expire; the next new key sweeps them
    w.admit_now(BoundLayers([(100, 10.0, ("user", "carol"))]))
    w.admit_now(BoundLayers([(100, 10.0, ("user", "dave"))]))
    assert w.admit_now(alice).failed == -1
    bob = BoundLayers([ip, (100, 10.0, ("user", "bob"))])
    assert w.admit_now(bob).remaining == 1  # alice's request after the sweep counted for the IP
    assert w.admit_now(alice).failed == -1
    assert w.admit_now(bob).failed == 0  # the shared IP layer (3 per 10 s) is full


@pytest.mark.parametrize("exact", [0, 1000])
@pytest.mark.parametrize("user_first", [False, True])
async def test_refusal_names_the_layer_that_frees_up_last(user_first: bool, exact: int) -> None:
    """Retry-After must cover every full layer: retrying after the shorter wait would only
    earn another 429 from the longer one."""
    clock = Clock(1000.0)
    w = MemoryWindows(clock, exact_up_to=exact)
    short = (2, 10.0, ("ip", "1.1.1.1"))
    long = (2, 100.0, ("user", "u"))
    layers = [long, short] if user_first else [short, long]
    bound = BoundLayers(layers)
    # both layers now full
    assert w.admit_now(bound).failed == -1 and w.admit_now(bound).failed == -1
    clock.t = 1001.0
    refused = w.admit_now(bound)
    assert layers[refused.failed] is long
    # the 100 s window's log must lose its oldest (or its count decay), not the 10 s one's
    assert refused.wait > (100 if exact == 0 else 98)
    # the short layer alone would admit now
    clock.t += w.admit_now(BoundLayers([short])).wait + 0.01
    assert w.admit_now(BoundLayers([short])).failed == -1
    assert layers[w.admit_now(bound).failed] is long  # ... but the long one still refuses
    clock.t = 1001.0 + refused.wait + 0.01
    assert w.admit_now(BoundLayers([long])).failed == -1  # after the reported wait it fits
