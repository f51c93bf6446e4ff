"""The emulator's state: call counters, the last request, fail-times budgets and reply ids.

Tests and benchmarks read the counters (``/_emulator/stats``: how many calls reached the
upstream) and the last request (``/_emulator/last``: what the gateway actually sent), and reset
them between cases. The endpoint groups that mint ids build on this class, and ``app``'s
``_Emulator`` on all of them.
"""

from __future__ import annotations

import itertools
import secrets
from collections import Counter
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from proxy.emulator.controls import _Controls
from proxy.emulator.wire import _json


class _State:
    """The emulator's state (counters, last request, failure budgets) and its handlers."""

    def __init__(self, api_key: str | None) -> None:
        self.api_key = api_key
        self.bearer = f"Bearer {api_key}"
        self.requests = 0
        self.by_path: Counter[str] = Counter()
        self.in_flight = 0
        self.failures: Counter[str] = Counter()
        self.last: tuple[str, Mapping[str, str], Any] | None = None
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(6)

    def new_id(self, prefix: str) -> str:
        """A unique id in the provider's style; a counter is cheaper than randomness per call."""
        return f"{prefix}{self._prefix}{next(self._ids):08x}"

    def _injected_status(self, ctl: _Controls) -> int | None:
        """The error status to answer with: always, or for the first N requests of a key."""
        if ctl.fail_times is None:
            return ctl.status
        self.failures[ctl.key] += 1
        return (ctl.status or 500) if self.failures[ctl.key] <= ctl.fail_times else None

    # ---- control and inspection ------------------------------------------------------------

    async def stats(self, request: web.Request) -> web.Response:
        return _json(
            {"requests": self.requests, "by_path": self.by_path, "in_flight": self.in_flight}
        )

    async def reset(self, request: web.Request) -> web.Response:
        """Zero the counters and fail-times budgets; in_flight keeps tracking live requests."""
        self.requests = 0
        self.by_path.clear()
        self.failures.clear()
        return _json({"ok": True})

    async def last_request(self, request: web.Request) -> web.Response:
        """The last /v1 request; header names are lower-cased so tests can look them up."""
        if self.last is None:
            return _json({"path": None, "headers": {}, "body": None})
        path, headers, body = self.last
        lowered = {k.lower(): v for k, v in headers.items()}
        return _json({"path": path, "headers": lowered, "body": body})
