"""Whether ``tollway meter`` reaches Redis, and how it waits for it when it does not.

The meter may start before Redis, or lose it for a while: it keeps serving (``/healthz``, and
``/admin/stats`` saying Redis is unavailable), its consumer retries with a backoff, and it makes
its consumer group and loads the stream once Redis is back. The outage is logged as
``proxy.statewatch`` logs a gateway's: one line when it starts, then at most one per
``REPORT_EVERY`` seconds, and one when it ends; never a line, let alone a traceback, per attempt.
"""

from __future__ import annotations

import logging
import threading
import time

from proxy.statewatch import REPORT_EVERY

log = logging.getLogger("tollway.meter")

FIRST_RETRY = 0.5
MAX_RETRY = 5.0
"""Seconds between two attempts: doubling from ``FIRST_RETRY`` up to ``MAX_RETRY``, so a long
outage costs few connection attempts and the meter goes on at most ``MAX_RETRY`` seconds after
Redis is back (a query's drain reaches it at once)."""


class RedisOutage:
    """The meter's view of Redis: written by whoever hits Redis, read by ``/admin/stats``."""

    def __init__(self) -> None:
        self.available = True
        self.since = 0.0  # time.monotonic() when the current outage started
        self.attempts = 0  # failed attempts in the current outage
        self._reported = 0.0
        self._lock = threading.Lock()  # the consumer thread and the constructor's caller

    def failed(self, exc: BaseException) -> float:
        """An attempt failed with a state error (``proxy.statewatch.is_state_error``); returns
        the seconds to wait before the next one."""
        with self._lock:
            now = time.monotonic()
            if self.available:
                self.available = False
                self.since = self._reported = now
                self.attempts = 0
                log.warning(
                    "Redis (state.url) unreachable (%s); the usage stream is loaded once it is "
                    "back, retrying",
                    type(exc).__name__,
                )
            elif now - self._reported >= REPORT_EVERY:
                self._reported = now
                log.warning(
                    "Redis (state.url) still unreachable after %.0fs (%d attempts, %s); retrying",
                    now - self.since,
                    self.attempts,
                    type(exc).__name__,
                )
            self.attempts += 1
            return min(MAX_RETRY, FIRST_RETRY * 2 ** min(self.attempts - 1, 16))

    def reached(self) -> None:
        """An attempt reached Redis: the outage, if any, is over."""
        with self._lock:
            if self.available:
                return
            self.available = True
            log.warning(
                "Redis (state.url) reachable again after %.1fs; loading the usage stream",
                time.monotonic() - self.since,
            )

    def down_for(self) -> float | None:
        """Seconds since the current outage started; None when Redis is reachable."""
        return None if self.available else round(time.monotonic() - self.since, 3)
