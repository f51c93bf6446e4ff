"""``proxy.tasks.stop``: a background loop stops even when a cancellation is lost on the way.

The lost cancellation is made here the way redis-py meets it on Python 3.11: the loop awaits
``asyncio.wait_for`` of a future that completes in the same pass of the event loop as the
cancellation arrives (CPython gh-86296); ``wait_for`` then returns instead of raising.
"""

from __future__ import annotations

import asyncio
import sys

import pytest

from proxy import tasks


class Loop:
    """A ``while True`` loop around ``wait_for``, like a Redis follower; ``pending`` is the
    future it waits on now."""

    def __init__(self) -> None:
        self.pending: asyncio.Future[None] | None = None
        self.rounds = 0

    async def run(self) -> None:
        while True:
            self.pending = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self.pending, 10)
            self.rounds += 1


async def waiting(loop: Loop) -> asyncio.Task[None]:
    """``loop`` running in a task of its own, waiting on its future."""
    task = asyncio.get_running_loop().create_task(loop.run())
    await asyncio.sleep(0)
    assert loop.pending is not None
    return task


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for keeps cancellations since 3.12")
async def test_the_runtime_loses_a_cancellation() -> None:
    """Why ``stop`` exists: the future completes, the cancellation arrives in the same pass,
    and the loop carries on as if it never came."""
    loop = Loop()
    task = await waiting(loop)
    assert loop.pending is not None
    loop.pending.set_result(None)
    task.cancel()
    await asyncio.sleep(0.05)
    try:
        assert not task.done() and loop.rounds == 1 and task.cancelling() == 1
    finally:
        await tasks.stop(task, "the loop")


async def test_a_lost_cancellation_is_sent_again() -> None:
    """The cancellation ``stop`` sends itself is the one lost: it sends another."""
    loop = Loop()
    task = await waiting(loop)
    assert loop.pending is not None
    loop.pending.set_result(None)  # completes in the pass in which stop cancels
    stopping = asyncio.get_running_loop().create_task(tasks.stop(task, "the loop"))
    ended, _ = await asyncio.wait((stopping,), timeout=5)  # (not wait_for: it cancels again)
    try:
        assert stopping in ended and task.cancelled(), "the loop is still running"
    finally:
        stopping.cancel()
        task.cancel()


async def test_a_task_that_ignores_cancellation_is_left_after_the_patience(
    caplog: pytest.LogCaptureFixture,
) -> None:
    done = asyncio.Event()

    async def stubborn() -> None:
        while not done.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                pass

    task = asyncio.get_running_loop().create_task(stubborn())
    await asyncio.sleep(0)  # running: in its loop
    began = asyncio.get_running_loop().time()
    await tasks.stop(task, "the stubborn loop", patience=0.3)
    took = asyncio.get_running_loop().time() - began
    assert not task.done() and 0.3 <= took < 3.0
    assert "the stubborn loop did not stop within 0.3s" in caplog.text
    done.set()  # (it ends by itself now: nothing is left running in the suite's loop)
    await asyncio.wait_for(task, 5)


async def test_the_tasks_own_failure_is_raised_as_awaiting_it_would(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails() -> None:
        raise RuntimeError("broken loop")

    task = asyncio.get_running_loop().create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="broken loop"):
        await tasks.stop(task, "the loop")
    await tasks.stop(None, "nothing")  # no task: nothing to do
    finished = asyncio.get_running_loop().create_task(asyncio.sleep(0))
    await finished
    await tasks.stop(finished, "a finished task")
    assert not caplog.records
