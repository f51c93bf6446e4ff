"""A store's backend failures, logged at most once per interval (the rest counted in the line).

A store in front of Redis (the response cache, the stored responses) fails every operation
while Redis is down; one line per operation would flood the log during an outage that each
caller already handles (a cache miss, a skipped write). So the first failure is logged, the
next ones within ``every`` seconds are only counted, and the next line says how many there
were. Only the exception's type is logged: its message can embed a key or a payload.

Why in the core: both stores need exactly this, and a plugin never imports another plugin.
"""

from __future__ import annotations

import logging
import time

EVERY = 10.0
"""Seconds between two log lines about one store's failures."""


class FailureLog:
    """Logs a store's failed operations on ``log`` as ``what``, once per ``every`` seconds."""

    __slots__ = ("_logged", "every", "log", "unlogged", "what")

    def __init__(self, log: logging.Logger, what: str, every: float = EVERY) -> None:
        self.log = log
        self.what = what
        self.every = every
        self.unlogged = 0  # failures since the last line
        self._logged = -every

    def failed(self, op: str, backend: str, exc: BaseException) -> None:
        """Operation ``op`` failed on the ``backend`` (its URL scheme) with ``exc``."""
        now = time.monotonic()
        if now - self._logged < self.every:
            self.unlogged += 1
            return
        self._logged = now
        more, self.unlogged = self.unlogged, 0
        self.log.warning(
            "%s: %s failed on the %s backend: %s (%d more failures since the last line)",
            self.what,
            op,
            backend,
            type(exc).__name__,
            more,
        )
