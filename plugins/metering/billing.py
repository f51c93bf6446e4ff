"""Invoice rules beyond usage lines: overage past the monthly quota, and the subscription
prorated when the plan changes during the month.

Overage (``tiers.X.overage``): the month's billable requests of a user (status < 400, endpoints
that are sold: not ``proxy.context.UNBILLED_ENDPOINTS``) are numbered in time order; the k-th is
past the quota when k is above ``requests_per_month`` of the plan it was made on. Each such
request is billed ``price_per_request``, and its tokens (input + output) ``price_per_mtok`` per
million, as lines of their own, after a zero line stating the quota used ("quota: 1000 of 1000
requests included"). The monthly quota counter of the limits plugin also counts requests
abandoned by their client (status 499), so it may pass the quota a little before the invoice
does: the invoice bills only requests that were answered.

Proration: each UTC day of the month is billed to the plan in force at its end: the plan of the
user's last request up to that day's end, or, for the days before the month's first request,
the plan of the last request before the month (else of the month's first request: a user
whose plan never changed pays the whole month's price, as before). Each plan's line is
``monthly_cost x its days / days in the month``, rounded half up to the cent; the total is the
sum of the rounded lines. A plan change therefore shows from the day of the first request made
on the new plan.
"""

from __future__ import annotations

import calendar
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any

from proxy.context import UNBILLED_ENDPOINTS

if TYPE_CHECKING:
    import duckdb  # the database module's: plan_terms is read where DuckDB is not loaded

CENT = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class PlanTerms:
    """What the invoice needs of a tier beyond its price: its quota and overage prices."""

    quota: int | None
    per_request: float
    per_mtok: float


def plan_terms(tiers: Mapping[str, Any]) -> dict[str, PlanTerms]:
    """The tiers with ``overage`` (policy ``Tier`` objects) as ``PlanTerms``."""
    out = {}
    for name, t in tiers.items():
        if t.overage is not None and t.requests_per_month != "unlimited":
            out[name] = PlanTerms(
                int(t.requests_per_month), t.overage.price_per_request, t.overage.price_per_mtok
            )
    return out


def plan_days(
    cur: duckdb.DuckDBPyConnection, user: str, start: datetime, end: datetime
) -> list[tuple[str, int]]:
    """``[(tier, days)]`` in order of first use: the days of the month each plan was in
    force (see the module docstring); [] when the user made no request in the month."""
    s, e = start.replace(tzinfo=None), end.replace(tzinfo=None)
    by_day = dict(
        cur.execute(
            "SELECT CAST(ts AS DATE) AS day, arg_max(tier, ts) FROM usage "
            "WHERE user_id = ? AND ts >= ? AND ts < ? AND tier IS NOT NULL GROUP BY day",
            [user, s, e],
        ).fetchall()
    )
    if not by_day:
        return []
    before = cur.execute(
        "SELECT tier FROM usage WHERE user_id = ? AND ts < ? AND tier IS NOT NULL "
        "ORDER BY ts DESC LIMIT 1",
        [user, s],
    ).fetchone()
    tier: str = before[0] if before else by_day[min(by_day)]
    days: dict[str, int] = {}
    day: date = start.date()
    while day < end.date():
        tier = by_day.get(day, tier)
        days[tier] = days.get(tier, 0) + 1
        day += timedelta(days=1)
    return list(days.items())


def subscription_lines(
    days: list[tuple[str, int]], month: str, costs: Mapping[str, float]
) -> list[tuple[str, Decimal]]:
    """``[(description, amount)]``: one line per plan, prorated by days when there are two or
    more plans in the month."""
    if len(days) == 1:
        tier = days[0][0]
        return [(f"{tier} plan, {month}", Decimal(str(costs.get(tier, 0))))]
    year, mon = (int(x) for x in month.split("-"))
    in_month = calendar.monthrange(year, mon)[1]
    return [
        (
            f"{tier} plan, {month}: {n} of {in_month} days",
            (Decimal(str(costs.get(tier, 0))) * n / in_month).quantize(CENT, ROUND_HALF_UP),
        )
        for tier, n in days
    ]


def overage(
    cur: duckdb.DuckDBPyConnection,
    user: str,
    start: datetime,
    end: datetime,
    terms: Mapping[str, PlanTerms],
) -> list[tuple[str, int, int, int]]:
    """``[(tier, included, past the quota, their tokens)]`` for each plan with overage
    terms the user made requests on in the month."""
    plans = [(t, p.quota) for t, p in terms.items() if p.quota is not None]
    if not plans:
        return []
    values = ", ".join("(?, ?)" for _ in plans)
    unbilled = sorted(UNBILLED_ENDPOINTS)
    marks = ", ".join("?" for _ in unbilled) or "NULL"
    rows = cur.execute(
        f"""
        WITH counted AS (
            SELECT tier, coalesce(input_tokens, 0) + coalesce(output_tokens, 0) AS tokens,
                   row_number() OVER (ORDER BY ts, request_id) AS k
            FROM usage
            WHERE user_id = ? AND ts >= ? AND ts < ? AND status < 400
              AND endpoint NOT IN ({marks})
        )
        SELECT c.tier, count(*) FILTER (WHERE c.k <= q.quota),
               count(*) FILTER (WHERE c.k > q.quota),
               coalesce(sum(c.tokens) FILTER (WHERE c.k > q.quota), 0)
        FROM counted c JOIN (VALUES {values}) AS q(tier, quota) ON c.tier = q.tier
        GROUP BY c.tier ORDER BY c.tier
        """,
        [
            user,
            start.replace(tzinfo=None),
            end.replace(tzinfo=None),
            *unbilled,
            *(x for plan in plans for x in plan),
        ],
    ).fetchall()
    return [(t, int(inc), int(over), int(tok)) for t, inc, over, tok in rows]
