"""What a plugin shows on the dashboard: the value types of the ``dashboard_figures`` hook.

The page (``proxy/dashboard.py``) carries no knowledge of any plugin: it renders the cards and
tables it receives in ``/admin/stats`` by their format, so a plugin (built-in or third-party)
adds a figure by returning it, and the core never names a plugin's metric or view. Plain frozen
dataclasses, no I/O: a plugin builds them when someone looks at the dashboard, never per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Format = Literal["count", "money", "percent", "ms", "text"]
"""How the page writes a value: ``count`` and ``text`` as they are, ``money`` as ``$12.34``,
``percent`` as ``12.3 %``, ``ms`` as ``12.34 ms``; a missing value (None) as ``-``."""


@dataclass(slots=True, frozen=True)
class Card:
    """One value in a card of its own (revenue this month, requests waiting...)."""

    name: str
    """The card's key in ``/admin/stats`` and its element id on the page: unique on the page
    (a name the core or an earlier plugin already uses is dropped)."""
    label: str
    value: Any
    format: Format = "count"


@dataclass(slots=True, frozen=True)
class Column:
    """One column of a table: the key of each row's value, its heading and format."""

    key: str
    heading: str
    format: Format = "text"


@dataclass(slots=True, frozen=True)
class Table:
    """A titled table of records (top users...); each row is a dict keyed by column keys."""

    name: str
    """The table's key in ``/admin/stats`` and the id of its ``<tbody>``: unique on the page."""
    title: str
    columns: tuple[Column, ...]
    rows: list[dict[str, Any]]


@dataclass(slots=True, frozen=True)
class Figures:
    """Everything one plugin contributes to one ``/admin/stats`` answer."""

    cards: tuple[Card, ...] = ()
    tables: tuple[Table, ...] = ()
    sections: dict[str, Any] = field(default_factory=dict)
    """Named JSON sections added to ``/admin/stats`` as they are, for programs polling it
    (metering's ``usage``: its views); a name the core's answer already has is dropped."""
    queued: int = 0
    """Requests this plugin holds waiting (an admission queue): summed over the chain into the
    autoscaling signal ``scaling.queued``, whose thresholds are the core's."""
