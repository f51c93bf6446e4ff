"""Helpers of the budget tests: a policy with priced features, the plugin of a gateway, a
fixed clock and a receiver of the gateway's events."""

from __future__ import annotations

import calendar
from typing import Any

from plugins.budgets.plugin import BudgetsPlugin
from proxy.appkeys import RESOURCES
from proxy.events import EVENTS, Event, EventBus
from tests.conftest import Gw, policy

CHAIN = [{"name": "auth"}, {"name": "budgets"}, {"name": "metering"}]


def priced(**tiers: Any) -> dict[str, Any]:
    """The tests' policy with a $0.50 feature (report, pro) and a $0.01 one, and ``tiers`` merged in."""
    return {
        **policy(),
        "features": {
            "report": {"price_per_request": 0.5},
            "basic_suggestions": {"price_per_request": 0.01},
        },
        "tiers": policy(
            {
                "free": {"requests_per_month": 1000, "features": ["basic_suggestions"]},
                "pro": {"includes": "free", "monthly_cost": 29, "features": ["report"]},
            },
            **tiers,
        ),
    }


def metering(db: Any) -> dict[str, Any]:
    return {"name": "metering", "config": {"database": str(db), "flush_interval": "50ms"}}


def plugin(gw: Gw) -> BudgetsPlugin:
    (found,) = [p for p in gw.gateway.runtime.chain.plugins if isinstance(p, BudgetsPlugin)]
    return found


class Clock:
    """An injected wall clock (UNIX seconds)."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def at(year: int, month: int, day: int, hour: int = 12) -> float:
    return float(calendar.timegm((year, month, day, hour, 0, 0)))


def events(gw: Gw) -> list[Event]:
    """Every event the gateway emits from now on."""
    got: list[Event] = []
    gw.app[RESOURCES].get(EVENTS, EventBus).subscribe(got.append)
    return got
