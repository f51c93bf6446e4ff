"""Business events: what one plugin notices and another delivers (budget and quota thresholds,
a key about to expire).

A plugin that decides on the request path (limits, budgets, keys) knows when a threshold is
crossed, but it must not wait on a webhook, and it should not know who listens. It emits an
``Event`` on the application's ``EventBus`` (``resources.get(EVENTS, EventBus)`` in its
``lifespan``); a delivering plugin (webhooks) subscribes to the same bus. ``emit`` is
synchronous and cheap: it hands the event to each subscriber, which must only queue it.

``dedupe`` names the occurrence, so that a subscriber can deliver each event once even when
several instances (or a restart) notice the same crossing: e.g. ``"budget:alice:2026-12:80"``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.context import StashKey

log = logging.getLogger("tollway")


@dataclass(frozen=True, slots=True)
class Event:
    """One occurrence worth telling an operator or a customer about.

    ``kind``: a dotted name (``budget.threshold``, ``quota.threshold``, ``key.expiring``);
    ``subject``: whom it concerns (a user id, or a key id for key events); ``dedupe``: the
    occurrence's identity, equal for every instance that notices it; ``data``: JSON-able
    details (the threshold, the amounts, the period).
    """

    kind: str
    subject: str
    dedupe: str
    data: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)


Subscriber = Callable[[Event], None]


class EventBus:
    """Fan-out of events to subscribers, in process; a subscriber that fails is logged."""

    __slots__ = ("_subscribers",)

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Add ``fn``; the returned function removes it (a reloaded plugin re-subscribes)."""
        self._subscribers.append(fn)

        def unsubscribe() -> None:
            if fn in self._subscribers:
                self._subscribers.remove(fn)

        return unsubscribe

    def emit(self, event: Event) -> None:
        """Hand ``event`` to every subscriber; never raises and never blocks."""
        for fn in tuple(self._subscribers):
            try:
                fn(event)
            except Exception:
                log.exception("an event subscriber failed (%s)", event.kind)


EVENTS: StashKey[EventBus] = StashKey()
"""The application's bus in ``Resources``: ``resources.get(EVENTS, EventBus)``."""
