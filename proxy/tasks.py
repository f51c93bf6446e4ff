"""Stopping a background task for sure: cancel it, again if the cancellation was lost.

A background loop (``while True: ... await ...``) is stopped by cancelling it and awaiting it.
On Python 3.11 one cancellation can be lost: ``asyncio.wait_for`` returns the inner result
instead of raising when the cancellation arrives in the same pass of the event loop in which
the inner awaitable finished (CPython gh-86296, fixed in 3.12 where ``wait_for`` is built on
``asyncio.timeout``). redis-py wraps each command it writes in ``wait_for`` when its client has
a socket timeout, so a loop cancelled while it talks to Redis (re-subscribing, re-seeding) can
swallow the one cancellation and carry on, and an owner awaiting it waits forever: a gateway
that never finishes stopping (seen as a test teardown that hung until the suite's timeout).

``stop`` cancels, waits a moment, and cancels again while the task is still running, so a lost
cancellation is followed by one that lands; a task that ignores every cancellation is left
running after ``patience`` seconds, with a warning, rather than hold the shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("tollway")

AGAIN_AFTER = 0.1
"""Seconds a cancelled task gets to end before it is cancelled again."""


async def stop(task: asyncio.Task[Any] | None, what: str, patience: float = 5.0) -> None:
    """Cancel ``task`` and wait until it ended (cancelled again every ``AGAIN_AFTER`` seconds
    while it runs on), for at most ``patience`` seconds. An exception the task ended with
    (other than its cancellation) is raised here, as awaiting it would."""
    if task is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while not task.done():
        left = deadline - loop.time()
        if left <= 0:
            log.warning(
                "%s did not stop within %gs of being cancelled; left running", what, patience
            )
            return
        task.cancel()
        await asyncio.wait((task,), timeout=min(AGAIN_AFTER, left))
    if not task.cancelled():
        task.result()
