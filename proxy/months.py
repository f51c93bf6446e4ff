"""Calendar months (UTC): the period monthly quotas and budgets count in and reset after.

One definition for every plugin that counts per month, so a quota and a budget of the same
request always agree on which month it belongs to and when that month ends.
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime


def month_of(ts: float) -> str:
    """``YYYY-MM`` of a UNIX time, in UTC."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m")


def next_month_start(ts: float) -> float:
    """UNIX time of the first instant of the next calendar month (UTC): a monthly reset."""
    d = datetime.fromtimestamp(ts, UTC)
    year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


class MonthCache:
    """The current UTC month and its end, recomputed only when the month changes: the request
    path asks every request, and formatting a date each time would cost more than the check."""

    def __init__(self) -> None:
        self._until = 0.0
        self._value = ("", 0.0)

    def current(self, now: float) -> tuple[str, float]:
        """``(YYYY-MM, the next month's first instant)`` for ``now`` (a clock set back by more
        than a month recomputes too)."""
        if now >= self._until or now < self._until - 32 * 86400:
            reset = next_month_start(now)
            self._value, self._until = (month_of(now), reset), reset
        return self._value
