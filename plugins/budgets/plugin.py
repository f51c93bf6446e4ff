"""budgets: monthly spending limits in money, per user (and per key), with alerts.

A user's budget is their tier's ``budget`` (``tiers.pro.budget: {usd: 5, basis: price,
alerts: [50, 80, 100], hard: true}``) unless the admin API gave them their own
(``PUT /admin/budgets/{user}``: it replaces the tier's whole). A key with ``budget_usd`` (its
record's, ``principal.attrs``) has a budget of its own besides, counted on the user's basis
(price when the user has no budget) with the user's alerts, always hard. Months are calendar
months, UTC.

``basis: price`` counts what the customer is billed (the usage row's ``price_usd``: the
feature's price per request, the tier's ``prices`` override; 0 for a failed or refused
request); ``basis: cost`` counts what the providers charge (``cost_usd``: tokens at the
model's prices; 0 for a cache hit). Both come from ``proxy.pricing``, the
functions the usage row is built with, so a budget and the invoice agree.

Admission (``access``, after ``limits``): the request reserves an estimate, and a hard budget
refuses it when spent + reserved + estimate would pass the budget: HTTP 402, OpenAI shape
``insufficient_quota`` / code ``budget_exceeded``, Anthropic ``billing_error``; no Retry-After
(waiting a few seconds does not help) but the reset in the message and in
``x-tollway-budget-reset`` (ISO 8601, the next month's first instant, UTC). Estimates: price
basis, the feature's price (exact: what a success is billed); cost basis, input = the prompt's
JSON bytes / 4 tokens, output = the request's ``max_tokens`` (``max_completion_tokens``,
``max_output_tokens``) or ``default_output_tokens``, at the route's prices (the dearest model's
when no route is set yet, e.g. ``model: auto`` before routing). Settlement (``log``): the
reservation is replaced by the real amount, streams included (a stream ends in ``log``).

Events (``proxy.events``): ``budget.threshold`` when a settlement takes the month's spending
across one of the budget's ``alerts`` percents (data: percent, spent_usd, budget_usd, month,
basis, scope; dedupe ``budget:USER:MONTH:PCT``, a key's ``budget:key:KEY_ID:MONTH:PCT``), and
``budget.exceeded`` the first time this instance refuses a request of the month (dedupe
``budget:USER:MONTH:exceeded``). Only the settlement whose atomic increment crosses a
percent sees the crossing, so one instance emits it, once.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from plugins.budgets.ledger import ADMITTED, NANO, Charge, Ledger, MonthCache, open_ledger
from plugins.budgets.overrides import UserBudgets
from proxy.appkeys import METRICS, RESOURCES
from proxy.context import UNBILLED_ENDPOINTS, Principal, RequestContext, StashKey
from proxy.errors import Reject
from proxy.events import EVENTS, Event, EventBus
from proxy.hookspecs import hookimpl
from proxy.policy import Budget, Policy
from proxy.pricing import (
    feature_price,
    feature_price_of,
    prompt_tokens_estimate,
    request_cost_nano,
)
from proxy.statewatch import STATE_WATCH, StateWatch

LEDGER: StashKey[Ledger] = StashKey()
USERS: StashKey[UserBudgets] = StashKey()
_HELD: StashKey[tuple[str, list[Charge], tuple[Rule, ...]]] = StashKey()

Basis = Literal["price", "cost"]


class BudgetsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    default_output_tokens: int = Field(
        1024,
        ge=0,
        description="Output tokens a cost-basis estimate assumes when the request sets no "
        "max_tokens (max_completion_tokens, max_output_tokens).",
    )
    spent_file: str | None = Field(
        "budgets.json",
        description="File under state.dir keeping this instance's spending per account and "
        "month across restarts (and re-seeding a Redis that lost it).",
    )
    users_file: str | None = Field(
        "budgets-users.json",
        description="File under state.dir keeping the per-user budgets set by the admin API.",
    )


@dataclass(slots=True, frozen=True)
class Rule:
    """A budget compiled for the hot path: whose it is, in nano-USD."""

    scope: Literal["user", "key"]
    subject: str
    limit: int
    usd: float
    basis: Basis
    alerts: tuple[int, ...]
    hard: bool
    source: str  # "tier", "user" (admin API) or "key"

    @property
    def account(self) -> str:
        """The ledger's name of the budget: ``u:USER`` or ``k:KEY_ID``."""
        return ("u:" if self.scope == "user" else "k:") + self.subject


def _rule(scope: Literal["user", "key"], subject: str, b: Budget, source: str) -> Rule:
    return Rule(
        scope, subject, round(b.usd * NANO), b.usd, b.basis, tuple(b.alerts), b.hard, source
    )


def usd(nano: int) -> float:
    """Nano-USD as dollars (JSON answers and event data)."""
    return round(nano / NANO, 9)


class BudgetsPlugin:
    """Reserve at admission, settle at log; see the module docstring."""

    Config = BudgetsConfig

    def __init__(self, config: BudgetsConfig, policy: Policy) -> None:
        self.config = config
        self.policy = policy
        self.tier_budgets = {n: t.budget for n, t in policy.tiers.items() if t.budget}
        self.prices = {name: f.price_per_request for name, f in policy.features.items()}
        self.tier_prices = {name: t.prices for name, t in policy.tiers.items() if t.prices}
        priced = [m for m in policy.models.values() if m.input_per_mtok is not None]
        self.dearest = (
            max((m.input_per_mtok or 0.0) for m in priced) if priced else 0.0,
            max((m.output_per_mtok or 0.0) for m in priced) if priced else 0.0,
        )
        self.month = MonthCache()
        self.clock: Callable[[], float] = time.time
        state_dir = policy.state.dir
        self.state_dir = Path(state_dir) if state_dir else None
        self.redis_url = policy.state.url if policy.state.distributed else None
        self.ledger: Ledger | None = None
        self.users: UserBudgets | None = None
        self.events: EventBus | None = None
        self.watch: StateWatch | None = None
        self._rules: dict[tuple[str, str | None], Rule | None] = {}
        self._rules_of: dict[str, Any] = {}  # the user records the cache was built from
        self._plans: dict[tuple[Any, ...], tuple[tuple[Rule, ...], list[Charge] | None]] = {}
        self._exceeded: set[str] = set()  # budget.exceeded emitted here (dedupe names)
        self.refused = 0
        self.alerts_emitted = 0

    # ---- resources ------------------------------------------------------------------------

    def _file(self, name: str | None) -> Path | None:
        return self.state_dir / name if self.state_dir and name else None

    @hookimpl
    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        resources = app[RESOURCES]
        self.watch = resources.find(STATE_WATCH)
        self.events = resources.get(EVENTS, EventBus)

        def ledger() -> Ledger:
            led = open_ledger(
                self.redis_url, self._file(self.config.spent_file), self.state_dir, self.watch
            )
            resources.on_close(led.close)
            return led

        def users() -> UserBudgets:
            interval = self.policy.state.check_interval
            u = UserBudgets(
                self._file(self.config.users_file), self.redis_url, self.watch, interval
            )
            resources.on_close(u.close)
            return u

        self.ledger = resources.get(LEDGER, ledger)
        await self.ledger.open()
        self.users = resources.get(USERS, users)
        await self.users.open()
        app[METRICS].add(
            "budgets",
            lambda: {
                "tollway_budget_refused": (
                    "counter",
                    "Requests refused because a hard budget was spent (402).",
                    self.refused,
                    (),
                ),
                "tollway_budget_alerts": (
                    "counter",
                    "budget.threshold events emitted by this instance.",
                    self.alerts_emitted,
                    (),
                ),
            },
        )
        yield

    # ---- which budget applies -------------------------------------------------------------

    def _check_users(self) -> dict[str, Any]:
        """The per-user budgets; when they changed, the compiled rules are dropped (rebuilt
        lazily)."""
        assert self.users is not None
        live = self.users.live
        if live is not self._rules_of:
            self._rules.clear()
            self._plans.clear()
            self._rules_of = live
        return live

    def user_rule(self, user: str, tier: str | None) -> Rule | None:
        """The user's budget: their own (admin API), else their tier's; None: no budget."""
        assert self.users is not None
        live = self._check_users()
        k = (user, tier)
        try:
            return self._rules[k]
        except KeyError:
            pass
        own = live.get(user)
        rule: Rule | None
        if own is not None:
            rule = _rule("user", user, Budget.model_validate(own["budget"]), "user")
        else:
            b = self.tier_budgets.get(tier or "")
            rule = _rule("user", user, b, "tier") if b is not None else None
        if len(self._rules) >= 10_000:
            self._rules.clear()
        self._rules[k] = rule
        return rule

    def key_rule(self, principal: Principal, user_rule: Rule | None) -> Rule | None:
        """The key's own budget (``budget_usd`` of its record), counted like the user's."""
        amount = principal.attrs.get("budget_usd") if principal.attrs else None
        if not amount or principal.key_id is None:
            return None
        return Rule(
            "key",
            principal.key_id,
            round(float(amount) * NANO),
            float(amount),
            user_rule.basis if user_rule else "price",
            user_rule.alerts if user_rule else (50, 80, 100),
            True,
            "key",
        )

    # ---- the request path -----------------------------------------------------------------

    def estimate(self, ctx: RequestContext, basis: Basis) -> int:
        """What the request is expected to add, in nano-USD (see the module docstring)."""
        if basis == "price":
            return round(feature_price(ctx, self.prices, self.tier_prices) * NANO)
        route = ctx.route
        if route is not None:
            if route.input_per_mtok is None:
                return 0  # a model without a price: its cost is unknown (NULL in the row)
            in_p, out_p = route.input_per_mtok, route.output_per_mtok or 0.0
        else:
            in_p, out_p = self.dearest
        body = ctx.body
        out = 0
        if ctx.endpoint != "embeddings":
            limit = (
                body.get("max_tokens")
                or body.get("max_completion_tokens")
                or body.get("max_output_tokens")
            )
            out = (
                limit if isinstance(limit, int) and limit > 0 else self.config.default_output_tokens
            )
            n = body.get("n")
            if isinstance(n, int) and n > 1:
                out *= n
        return round(prompt_tokens_estimate(body) * in_p * 1000 + out * out_p * 1000)

    def _compiled(
        self, p: Principal, feature: str | None, key_budget: Any
    ) -> tuple[tuple[Rule, ...], list[Charge] | None]:
        """The caller's budgets and, when every one is on the price basis, their charges (the
        same for every request of the feature: the estimate is the feature's price), kept
        until the per-user budgets change."""
        assert self.users is not None
        self._check_users()
        k = (p.user_id, p.tier, p.key_id, feature, key_budget)
        plan = self._plans.get(k)
        if plan is None:
            rule = self.user_rule(p.user_id, p.tier)
            krule = self.key_rule(p, rule) if key_budget else None
            rules = tuple(r for r in (rule, krule) if r is not None)
            charges: list[Charge] | None = None
            if all(r.basis == "price" for r in rules):
                est = round(feature_price_of(p.tier, feature, self.prices, self.tier_prices) * NANO)
                charges = [Charge(r.account, r.limit if r.hard else -1, est) for r in rules]
            if len(self._plans) >= 10_000:
                self._plans.clear()
            plan = self._plans[k] = (rules, charges)
        return plan

    @hookimpl
    async def access(self, ctx: RequestContext) -> None:
        p = ctx.principal
        if p is None or ctx.endpoint in UNBILLED_ENDPOINTS:
            return
        attrs = p.attrs
        rules, charges = self._compiled(p, ctx.feature, attrs.get("budget_usd") if attrs else None)
        if not rules:
            return
        if charges is None:  # a cost basis: estimated from this request's body
            charges = [
                Charge(r.account, r.limit if r.hard else -1, self.estimate(ctx, r.basis))
                for r in rules
            ]
        month, reset = self.month.current(self.clock())
        ledger = self.ledger
        assert ledger is not None
        watch = self.watch
        if watch is not None and not watch.available and watch.refuse:
            raise watch.reject()
        res = ledger.reserve_now(month, charges)
        if res is None:
            res = await ledger.reserve(month, charges)
            if watch is not None and watch.refuse and not watch.available:
                # Redis was lost during this reservation, so it was decided alone: refuse it
                # as every later request is, holding nothing
                if res[0] == ADMITTED:
                    await self._release(month, charges)
                raise watch.reject()
        if res[0] != ADMITTED:
            index = res[0]
            self._refuse(rules[index], charges[index], res[1], month, reset, p)
        ctx.stash[_HELD] = (month, charges, rules)

    async def _release(self, month: str, charges: list[Charge]) -> None:
        """Give back a reservation of a request that will not be served (settled to 0)."""
        ledger = self.ledger
        assert ledger is not None
        nothing = [0] * len(charges)
        if ledger.settle_now(month, charges, nothing) is None:
            await ledger.settle(month, charges, nothing)

    def _refuse(
        self, r: Rule, c: Charge, total: int, month: str, reset: float, p: Principal
    ) -> None:
        self.refused += 1
        dedupe = f"budget:{r.subject}:{month}:exceeded"
        if r.scope == "key":
            dedupe = f"budget:key:{r.subject}:{month}:exceeded"
        if dedupe not in self._exceeded and self.events is not None:
            if len(self._exceeded) > 100_000:
                self._exceeded.clear()
            self._exceeded.add(dedupe)
            self.events.emit(
                Event(
                    "budget.exceeded",
                    p.user_id if r.scope == "user" else r.subject,
                    dedupe,
                    {
                        "scope": r.scope,
                        "user": p.user_id,
                        "key_id": p.key_id,
                        "budget_usd": r.usd,
                        "spent_usd": usd(total),
                        "estimate_usd": usd(c.estimate),
                        "basis": r.basis,
                        "month": month,
                    },
                )
            )
        at = datetime.fromtimestamp(reset, UTC).isoformat()
        whose = "this key" if r.scope == "key" else f"user {p.user_id!r}"
        raise Reject(
            402,
            f"the monthly budget of {whose} (${r.usd:.2f}, {r.basis}) does not cover this "
            f"request: ${total / NANO:.2f} used or reserved, the request needs about "
            f"${c.estimate / NANO:.4f}; it resets at {at}",
            code="budget_exceeded",
            headers={"x-tollway-budget-reset": at},
        )

    def actual(self, ctx: RequestContext, basis: Basis, estimate: int) -> int:
        """What the request really added, in nano-USD: the usage row's price or cost. On the
        price basis that is the estimate (the feature's price) for a success, else 0: what
        ``request_price`` gives (asserted by the tests)."""
        if basis == "price":
            return estimate if 0 < ctx.status < 400 else 0
        return request_cost_nano(ctx)

    @hookimpl
    async def log(self, ctx: RequestContext) -> None:
        held = ctx.stash.pop(_HELD, None)  # settled once, whatever happens next
        if held is None or self.ledger is None:
            return
        month, charges, rules = held
        actuals = [
            self.actual(ctx, r.basis, c.estimate) for r, c in zip(rules, charges, strict=True)
        ]
        ledger = self.ledger
        totals = ledger.settle_now(month, charges, actuals)
        if totals is None:
            totals = await ledger.settle(month, charges, actuals)
        for r, actual, total in zip(rules, actuals, totals, strict=True):
            if actual and r.alerts:
                self._alerts(r, total - actual, total, month, ctx.principal)

    def _alerts(self, r: Rule, before: int, after: int, month: str, p: Principal | None) -> None:
        events = self.events
        if events is None:
            return
        for pct in r.alerts:
            level = r.limit * pct // 100
            if before < level <= after:
                self.alerts_emitted += 1
                name = r.subject if r.scope == "user" else f"key:{r.subject}"
                events.emit(
                    Event(
                        "budget.threshold",
                        r.subject,
                        f"budget:{name}:{month}:{pct}",
                        {
                            "percent": pct,
                            "spent_usd": usd(after),
                            "budget_usd": r.usd,
                            "month": month,
                            "basis": r.basis,
                            "scope": r.scope,
                            "user": p.user_id if p else None,
                        },
                    )
                )

    # ---- reading and managing budgets -----------------------------------------------------

    async def status(self, user: str, tier: str | None, month: str | None = None) -> dict[str, Any]:
        """The user's budget and the month's spending (admin API, self-service)."""
        assert self.ledger is not None
        now = self.clock()
        cur, reset = self.month.current(now)
        month = month or cur
        rule = self.user_rule(user, tier)
        spent, reserved = await self.ledger.status("u:" + user, month)
        out: dict[str, Any] = {
            "user": user,
            "month": month,
            "budget": None,
            "spent_usd": usd(spent),
            "reserved_usd": usd(reserved),
        }
        if rule is not None:
            out["budget"] = {
                "usd": rule.usd,
                "basis": rule.basis,
                "alerts": list(rule.alerts),
                "hard": rule.hard,
                "source": rule.source,
            }
            out["left_usd"] = usd(max(0, rule.limit - spent - reserved))
            if month == cur:
                out["resets_at"] = datetime.fromtimestamp(reset, UTC).isoformat()
        return out

    @hookimpl
    async def account_report(self, principal: Principal, month: str) -> Mapping[str, object]:
        report = await self.status(principal.user_id, principal.tier, month)
        krule = self.key_rule(principal, self.user_rule(principal.user_id, principal.tier))
        if krule is not None and self.ledger is not None:
            spent, reserved = await self.ledger.status("k:" + krule.subject, month)
            report["key"] = {
                "usd": krule.usd,
                "basis": krule.basis,
                "spent_usd": usd(spent),
                "reserved_usd": usd(reserved),
                "left_usd": usd(max(0, krule.limit - spent - reserved)),
            }
        return {"budget": report}

    @hookimpl
    async def forget_user(self, user_id: str) -> dict[str, int]:
        assert self.ledger is not None and self.users is not None
        months = await self.ledger.forget(["u:" + user_id])
        return {"budget_months": months, "budgets": await self.users.forget(user_id)}

    @hookimpl
    def register_routes(self) -> list[web.RouteDef]:
        from plugins.budgets.routes import routes

        return routes(self)

    @staticmethod
    @hookimpl
    def register_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        from plugins.budgets.cli import register

        register(subparsers)
