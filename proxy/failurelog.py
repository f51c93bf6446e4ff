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
import sys
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


class ErrorLog:
    """Exceptions that may repeat on every request (an internal error, a failing ``log``
    hook), logged without flooding: the first of each kind with its traceback, the next ones
    at most one line per ``every`` seconds, saying how many were not logged in between.

    A kind is the caller's ``what`` (e.g. the plugin's name) and the exception's type, so a
    new failure still gets its traceback while a known one is only counted. During an outage
    that fails every request the log grows by one line per interval, not a traceback per
    request. At most ``MAX_KINDS`` kinds are tracked; the rest share one.
    """

    MAX_KINDS = 256

    __slots__ = ("every", "kinds", "log")

    def __init__(self, log: logging.Logger, every: float = EVERY) -> None:
        self.log = log
        self.every = every
        self.kinds: dict[tuple[str, str], list[float]] = {}  # kind -> [last line, unlogged]

    def exception(self, what: str, message: str, *args: object) -> None:
        """Log the exception being handled as ``message % args`` (call it in ``except``)."""
        exc = sys.exc_info()[1]
        kind = (what, type(exc).__name__)
        state = self.kinds.get(kind)
        now = time.monotonic()
        if state is None:
            if len(self.kinds) >= self.MAX_KINDS:
                kind = ("", "other")
                state = self.kinds.get(kind)
            if state is None:
                self.kinds[kind] = [now, 0]
                self.log.exception(message, *args)
                return
        if now - state[0] < self.every:
            state[1] += 1
            return
        more = int(state[1])
        state[0], state[1] = now, 0
        self.log.error(
            message + ": %s again (%d more since the last line; traceback at the first)",
            *args,
            type(exc).__name__,
            more,
        )
