"""The metering plugin's dashboard figures: the business view of this month and the top users.

Queried from the usage views (``plugins.metering.database``) when the dashboard polls
``/admin/stats``, through the same bounded admin-query path as ``/admin/sql`` (loading what is
pending first), never on the request path. A view that cannot be read right now (too many
admin queries running, a shutdown) is left out of this answer, not an error of the page.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proxy.analytics import QueryError
from proxy.figures import Card, Column, Figures, Table

if TYPE_CHECKING:
    from proxy.analytics import AnalyticsBackend

VIEWS = (
    ("kpis", "SELECT * FROM kpis"),
    ("business", "SELECT * FROM business ORDER BY month DESC LIMIT 1"),
    (
        "top_users",
        "SELECT user_id, count(*) AS requests, sum(price_usd) AS revenue_usd "
        "FROM usage WHERE user_id IS NOT NULL GROUP BY user_id ORDER BY requests DESC LIMIT 5",
    ),
)
"""The views ``/admin/stats`` carries under ``usage``: one record each, top_users a list."""

TOP_USERS = (
    Column("user_id", "user"),
    Column("requests", "requests", "count"),
    Column("revenue_usd", "revenue", "money"),
)


async def usage_views(usage: AnalyticsBackend) -> dict[str, Any]:
    """The views that could be read now, by name."""
    out: dict[str, Any] = {}
    for view, query in VIEWS:
        try:
            columns, rows = await usage.sql(query)
        except QueryError:
            continue
        records = [dict(zip(columns, r, strict=True)) for r in rows]
        out[view] = records if view == "top_users" else (records[0] if records else None)
    return out


async def figures(usage: AnalyticsBackend) -> Figures:
    """The cards and the top-users table of this month, and the views as ``usage``."""
    views = await usage_views(usage)
    business = views.get("business") or {}
    return Figures(
        cards=(
            Card("revenue_usd", "revenue this month", business.get("revenue_usd"), "money"),
            Card(
                "provider_cost_usd",
                "provider cost this month",
                business.get("provider_cost_usd"),
                "money",
            ),
            Card("profit_margin", "margin", business.get("profit_margin"), "percent"),
            Card("mrr_usd", "MRR", business.get("mrr_usd"), "money"),
            Card("active_users", "active users", business.get("active_users")),
        ),
        tables=(Table("top_users", "Top users", TOP_USERS, views.get("top_users") or []),),
        sections={"usage": views},
    )
