"""A priority semaphore: a global cap on concurrent upstream requests with a bounded queue.

When every slot is taken, requests wait in a queue ordered by tier priority (higher first) and,
within a priority, by arrival (FIFO). A full queue or a wait longer than the timeout is refused
(the caller answers 503). A waiter that is cancelled (its client hung up) leaves the queue at
once, so it never holds a place or a slot.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field


class QueueFull(Exception):
    """The wait queue is at its maximum size."""


class QueueTimeout(Exception):
    """The request waited longer than the queue timeout."""


@dataclass(order=True, slots=True)
class _Waiter:
    sort_key: tuple[int, int]
    future: asyncio.Future[None] = field(compare=False)


class Admission:
    """``acquire(priority)`` a slot (waiting if needed), ``release()`` it after the upstream call."""

    def __init__(self, capacity: int, queue_max: int, timeout: float) -> None:
        self.capacity = capacity
        self.queue_max = queue_max
        self.timeout = timeout
        self.in_flight = 0
        self._heap: list[_Waiter] = []
        self._waiting = 0
        self._seq = itertools.count()
        self.rejected = 0

    @property
    def queued(self) -> int:
        """Requests waiting for a slot now."""
        return self._waiting

    def try_acquire(self) -> bool:
        """Take a free slot at once if there is one and nobody waits (the common case, without
        the cost of a coroutine); False: ``acquire`` must queue."""
        if self.in_flight < self.capacity and not self._waiting:
            self.in_flight += 1
            return True
        return False

    async def acquire(self, priority: int) -> None:
        """Take a slot; raises QueueFull or QueueTimeout; a cancelled wait leaves the queue."""
        if self.try_acquire():
            return
        if self._waiting >= self.queue_max:
            self.rejected += 1
            raise QueueFull
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, _Waiter((-priority, next(self._seq)), fut))
        self._waiting += 1
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.timeout)
        except (TimeoutError, asyncio.CancelledError) as e:
            if fut.done() and not fut.cancelled():
                # the slot was handed over just as we gave up: pass it on
                self.release()
            else:
                fut.cancel()
                self._waiting -= 1
            if isinstance(e, TimeoutError):
                self.rejected += 1
                raise QueueTimeout from None
            raise

    def release(self) -> None:
        """Hand the slot to the highest-priority live waiter, or free it."""
        while self._heap:
            waiter = heapq.heappop(self._heap)
            if waiter.future.cancelled():
                continue  # its client left; it was already uncounted
            self._waiting -= 1
            waiter.future.set_result(None)  # the slot moves to the waiter; in_flight unchanged
            return
        self.in_flight -= 1
