"""Shared: resources that outlive a policy reload (counters, queues, stores).

A reload builds new plugin instances, but rate-limit windows, quota counts and the admission
queue must carry over, or a reload would hand every caller a fresh limit. A plugin asks for such
a resource in its ``lifespan`` with a typed key: the first chain creates it, later chains get
the same object. Resources registered with ``on_close`` are closed once, at shutdown.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from proxy.context import Stash, StashKey

T = TypeVar("T")


class Shared:
    """A typed registry of long-lived objects, one per application."""

    def __init__(self) -> None:
        self._items = Stash()
        self._closers: list[Callable[[], Awaitable[None]]] = []

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

    async def close(self) -> None:
        while self._closers:
            await self._closers.pop()()
