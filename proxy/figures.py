"""What a plugin shows on the dashboard: the value types of the ``dashboard_figures`` hook.

The page (``proxy/dashboard.py``) carries no knowledge of any plugin: it renders the cards,
tables and charts it receives in ``/admin/stats`` by their format, so a plugin (built-in or
third-party) adds a figure by returning it, and the core never names a plugin's metric or view.
Plain frozen dataclasses, no I/O: a plugin builds them when someone looks at the dashboard,
never per request.
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
class Series:
    """One line of a chart: a value per point of the chart's ``times``."""

    label: str
    """The legend's name of the line ("requests", "p95"...)."""
    values: list[float | None]
    """One per point of the chart's times, in the same order; None where there was no data
    (the line breaks there instead of pretending a zero)."""


@dataclass(slots=True, frozen=True)
class Chart:
    """A history chart (requests per minute over the last hour...), drawn by the page as SVG.

    The points come already bucketed by the plugin (from its pre-aggregated tables), so the
    page only draws: it never sums or resamples, and what it draws is exactly what was sent.
    """

    name: str
    """The chart's key in ``/admin/stats`` ``charts`` and its element id: unique on the page
    (a name already taken is dropped, like cards and tables)."""
    title: str
    window: str
    """The time window the chart covers ("hour", "day" or any label): the page shows the
    charts of one window at a time, so a plugin sends a chart per window it offers."""
    step_s: int
    """Seconds per point (60 for per-minute points): the hover text and time axis use it."""
    times: list[float]
    """Epoch seconds of each point's start, ascending; every series has one value per time
    (a chart where a series' length differs is dropped and logged, never half drawn)."""
    series: tuple[Series, ...]
    format: Format = "count"


@dataclass(slots=True, frozen=True)
class Figures:
    """Everything one plugin contributes to one ``/admin/stats`` answer."""

    cards: tuple[Card, ...] = ()
    tables: tuple[Table, ...] = ()
    charts: tuple[Chart, ...] = ()
    """History charts: the page draws them itself (inline SVG, no library), so a plugin that
    keeps history (metering) shows it without the core knowing what it measures."""
    sections: dict[str, Any] = field(default_factory=dict)
    """Named JSON sections added to ``/admin/stats`` as they are, for programs polling it
    (metering's ``usage``: its views); a name the core's answer already has is dropped."""
    queued: int = 0
    """Requests this plugin holds waiting (an admission queue): summed over the chain into the
    autoscaling signal ``scaling.queued``, whose thresholds are the core's."""
