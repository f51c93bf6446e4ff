"""Resources: what outlives a policy reload (counters, queues, stores).

A reload builds new plugin instances, but rate-limit windows, quota counts and the admission
queue must carry over, or a reload would hand every caller a fresh limit. A plugin asks for such
a resource in its ``lifespan`` with a typed key: the first chain creates it, later chains get
the same object. Resources registered with ``on_close`` are closed once, at shutdown;
``on_shutdown`` callbacks run when the shutdown begins, before in-flight requests are waited for.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from proxy.context import Stash, StashKey

T = TypeVar("T")

log = logging.getLogger("tollway")


class Resources:
    """A typed registry of long-lived objects, one per application."""

    def __init__(self) -> None:
        self._items = Stash()
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._stoppers: list[Callable[[], Awaitable[None] | None]] = []

    def get(self, key: StashKey[T], factory: Callable[[], T]) -> T:
        """The object under ``key``, created by ``factory`` on first use."""
        if key not in self._items:
            self._items[key] = factory()
        return self._items[key]

    def put(self, key: StashKey[T], value: T) -> None:
        """Register ``value`` under ``key`` (replacing any earlier one)."""
        self._items[key] = value

    def find(self, key: StashKey[T]) -> T | None:
        """The object under ``key``, or None if no plugin registered one."""
        return self._items.get(key)

    def on_close(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn`` at shutdown (in reverse order of registration)."""
        self._closers.append(fn)

    def on_shutdown(self, fn: Callable[[], Awaitable[None] | None]) -> None:
        """Run ``fn`` (sync or async) once, when a shutdown begins: the listener is closed and
        in-flight requests are about to get ``listen.shutdown_timeout`` to finish.

        For work a request waits on that will not end by itself (an admin query with a long
        time limit): stopping it here answers its request at once, instead of the request
        holding the shutdown until it is cancelled. ``fn`` should start stopping, not wait;
        closing belongs in ``on_close``. Unlike aiohttp's ``app.on_shutdown``, this can be
        registered after the app started (a plugin first enabled by a policy reload).
        """
        self._stoppers.append(fn)

    async def shutdown(self) -> None:
        """Run the ``on_shutdown`` callbacks; one that fails is logged, the others still run."""
        while self._stoppers:
            fn = self._stoppers.pop(0)
            try:
                result = fn()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("a shutdown callback failed (%s)", getattr(fn, "__qualname__", fn))

    async def close(self) -> None:
        while self._closers:
            await self._closers.pop()()
