"""limits: tiers (features, models, monthly quota, per-minute limits) and multi-layer rate limits.

Checked in ``access``, before anything costs money, in this order: the tier's features, the
monthly quota, then the rate-limit layers (per IP, per user, per tier, per API key with a rate
of its own: ``Principal.attrs["rpm"]``; optional tokens per minute). Every layer is tested first and consumed only when all pass, so a rejected request
counts against nothing. A request that ends in an error is given back to the monthly quota.
Model allow-lists and the global admission queue are applied in ``upstream_request``, once the
route is final (a routing plugin may have changed the model) and just before the provider call.
A request of ``proxy.context.UNBILLED_ENDPOINTS`` (the token counts ``count_tokens`` and
``input_tokens``: free at the provider, not sold) passes the features, the rate-limit layers and the model allow-list like any other, but
takes no place in the monthly quota and is neither held back by nor charged to the
tokens-per-minute limit (a count's figure is tokens read, none generated).

Windows (``plugins.limits.windows``) are exact moving-window logs for limits of up to
``exact_up_to`` requests and sliding-window counters above; on Redis one script checks and
counts all of a request's layers in one round trip. ``Retry-After`` is the seconds until one
more request fits in every layer. Counters, quota counts and the admission queue
are kept across policy reloads (``proxy.resources``).

While Redis is unreachable (``proxy.statewatch``), ``state.on_unavailable`` decides: ``serve``
checks every layer and the quota on this instance alone (``FailoverWindows``, ``RedisQuota``'s
own counts), ``refuse`` answers 503 ``state_unavailable``. Nothing here adds a Redis call to
a request: the health is a flag the watch and failed calls keep.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from plugins.limits.admission import Admission, QueueFull, QueueTimeout
from plugins.limits.quota import Quota, open_quota
from plugins.limits.windows import (
    EXACT_UP_TO,
    QUOTA_REFUSED,
    UNDECIDED,
    BoundLayers,
    Layer,
    QuotaPart,
    Windows,
    open_windows,
)
from proxy.appkeys import METRICS, RESOURCES
from proxy.context import (
    UNBILLED_ENDPOINTS,
    Principal,
    RequestContext,
    StashKey,
    UpstreamRequest,
)
from proxy.errors import Reject
from proxy.events import EVENTS, Event, EventBus
from proxy.figures import Figures
from proxy.hookspecs import hookimpl
from proxy.months import MonthCache, next_month_start
from proxy.policy import Loc, Policy, Seconds, errors_at
from proxy.statewatch import STATE_WATCH, StateWatch

if TYPE_CHECKING:
    # imported where a limit is parsed or built: ``import limits`` loads every storage of the
    # library (~50 ms), and the CLI imports this module only to collect its commands
    import limits

WINDOWS: StashKey[Windows] = StashKey()
QUOTA: StashKey[Quota] = StashKey()
ADMISSION: StashKey[Admission] = StashKey()
_COUNTED: StashKey[str] = StashKey()
_SLOT: StashKey[bool] = StashKey()
_ADMITTED = {"tollway.admitted": True}
"""The attributes of a ``limits.queue`` phase that ended with a slot (one shared dict)."""
_RATE: StashKey[tuple[int, int, float]] = StashKey()
"""The admitting layer's limit, remaining count and seconds to its reset, decided in ``access``
and written as the reply's ``x-ratelimit-*`` headers by ``response_headers``."""


def _limit_list(values: list[str]) -> list[str]:
    """The list as given; each entry that is not a limit is reported at its index."""
    from limits import parse

    errors: list[tuple[Loc, str]] = []
    for i, v in enumerate(values):
        try:
            parse(v)
        except ValueError:
            errors.append(((i,), f"{v!r} is not a limit such as '60/minute' or '5 per 2 second'"))
    if errors:
        raise errors_at("limits", errors)
    return values


class GlobalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    concurrent_requests: int = Field(500, ge=1, description="Upstream requests in flight at once.")
    queue_max_size: int = Field(1000, ge=0, description="Requests that may wait for a slot.")
    queue_timeout: Seconds = Field(30.0, ge=0, description="Longest wait for a slot (then 503).")


class LimitsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    user: list[str] = Field(default_factory=list, description="Per-user limits, e.g. '60/minute'.")
    ip: list[str] = Field(
        default_factory=list, description="Per-client-IP limits, e.g. '100/minute'."
    )
    global_: GlobalConfig | None = Field(
        None, alias="global", description="Global concurrency cap and its wait queue."
    )
    quota_file: str | None = Field(
        "quota.json", description="File under state.dir keeping monthly counts across restarts."
    )
    exact_up_to: int = Field(
        EXACT_UP_TO,
        ge=0,
        description="Largest limit (requests per period) kept exactly: never more than the limit "
        "in any interval of its period, Retry-After at most the period, at one timestamp per "
        "admitted request. Larger limits use a sliding-window counter (two integers, up to "
        "twice the limit in the worst interval). Not changed by a reload.",
    )
    quota_alerts: list[int] = Field(
        [80, 100],
        description="Percents of a plan's monthly quota at which a user's count emits a "
        "quota.threshold event (delivered by the webhooks plugin), once per user and month.",
    )

    @field_validator("quota_alerts")
    @classmethod
    def _percents(cls, v: list[int]) -> list[int]:
        bad = [p for p in v if not 1 <= p <= 100]
        if bad:
            raise ValueError(f"quota_alerts are percents from 1 to 100, not {bad[0]}")
        return v

    @field_validator("user", "ip")
    @classmethod
    def _limits(cls, v: list[str]) -> list[str]:
        return _limit_list(v)


@dataclass(slots=True, frozen=True)
class TierRule:
    """A tier compiled for the hot path."""

    name: str
    features: frozenset[str]  # empty = every feature
    models: frozenset[str] | None
    monthly: int | None
    per_minute: limits.RateLimitItem | None
    tokens: limits.RateLimitItem | None
    priority: int
    alerts: tuple[tuple[int, int], ...] = ()
    """``(percent, count)`` of the monthly quota at which ``quota.threshold`` is emitted."""
    alert_from: int | None = None
    """The lowest of those counts: below it the request path compares one integer."""
    overage: bool = False
    """The tier bills requests past its quota (``tiers.X.overage``) instead of refusing them."""


def _window(amount: int, seconds: float) -> limits.RateLimitItem:
    from limits import RateLimitItemPerSecond

    return RateLimitItemPerSecond(amount, max(1, round(seconds)))


def compile_tiers(
    policy: Policy, period: float, alert_percents: Sequence[int] = (80, 100)
) -> dict[str, TierRule]:
    """Resolve ``includes`` chains into feature sets and build each tier's limit items and
    quota alert counts (``ceil`` of each percent of the quota)."""
    out = {}
    tiers = policy.tiers
    for name, tier in tiers.items():
        features: set[str] = set()
        seen: set[str] = set()
        cur: str | None = name
        while cur is not None and cur not in seen:
            seen.add(cur)
            features.update(tiers[cur].features)
            cur = tiers[cur].includes
        monthly = tier.requests_per_month
        alerts = (
            tuple((p, math.ceil(int(monthly) * p / 100)) for p in sorted(set(alert_percents)))
            if monthly != "unlimited"
            else ()
        )
        out[name] = TierRule(
            name=name,
            features=frozenset(features),
            models=policy.allowed_models(name),
            monthly=None if monthly == "unlimited" else int(monthly),
            overage=tier.overage is not None,
            per_minute=_window(tier.requests_per_minute, period)
            if tier.requests_per_minute
            else None,
            tokens=_window(tier.tokens_per_minute, period) if tier.tokens_per_minute else None,
            priority=policy.priority(name),
            alerts=alerts,
            alert_from=alerts[0][1] if alerts else None,
        )
    return out


def reset_string(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* format: '20ms', '1s', '6m0s', '1h2m3s'."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    s = math.ceil(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{sec}s"
    if m:
        return f"{m}m{sec}s"
    return f"{sec}s"


def _quota_refusal(rule: TierRule | None, monthly: int, reset: float, now: float) -> Reject:
    plan = rule.name if rule is not None else None
    return Reject(
        429,
        f"monthly quota of {monthly} requests for plan {plan!r} is used up; "
        f"it resets at {datetime.fromtimestamp(reset, UTC).isoformat()}",
        code="monthly_quota_exceeded",
        headers={"Retry-After": str(math.ceil(reset - now))},
    )


OVERAGE_COUNT = 2**52
"""The quota a tier with ``overage`` is counted against: requests past the plan's go on."""

LAYER_CACHE_SIZE = 10_000
"""Callers (user, address, tier) whose layer lists are kept; the cache is emptied when full."""


def _spec(item: limits.RateLimitItem) -> tuple[int, float]:
    return item.amount, float(item.get_expiry())


class LimitsPlugin:
    """Tiers and rate limits; see the module docstring for the order of checks."""

    Config = LimitsConfig

    tier_period: float = 60.0
    """Seconds of a tier's per-minute window. Not a policy key (a minute is a minute): a test
    that must see a window pass shortens it in a subclass, given as ``extra_plugins``."""

    def __init__(self, config: LimitsConfig, policy: Policy) -> None:
        from limits import parse

        self.config = config
        self.user_specs = [_spec(parse(s)) for s in config.user]
        self.ip_specs = [_spec(parse(s)) for s in config.ip]
        self.month = MonthCache()
        self.tiers = compile_tiers(policy, self.tier_period, config.quota_alerts)
        self.known_features = set(policy.features).union(
            *(t.features for t in policy.tiers.values())
        )
        if policy.default_feature:
            self.known_features.add(policy.default_feature)
        self.state_url = policy.state.url
        self.distributed = policy.state.distributed
        state_dir = policy.state.dir
        self.state_dir = Path(state_dir) if state_dir else None
        self.quota_path = (
            Path(state_dir) / config.quota_file if state_dir and config.quota_file else None
        )
        self.limiter: Windows | None = None
        self._layer_cache: dict[tuple[Any, ...], BoundLayers] = {}
        self.quota: Quota | None = None
        self.admission: Admission | None = None
        self.watch: StateWatch | None = None  # Redis's health (state.url: redis://)
        self.events: EventBus | None = None
        self._alerted: set[tuple[str, int]] = set()  # (user, percent) emitted this month
        self._alerted_month = ""

    @hookimpl
    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        resources = app[RESOURCES]
        self.watch = resources.find(STATE_WATCH)
        self.events = resources.get(EVENTS, EventBus)
        self.limiter = resources.get(WINDOWS, lambda: self._open_windows(resources))
        self.quota = resources.get(QUOTA, lambda: self._open_quota(resources))
        await self.quota.open()  # once: on Redis, puts this instance's shares back if lost
        g = self.config.global_
        if g is not None:
            adm = resources.get(
                ADMISSION,
                lambda: Admission(g.concurrent_requests, g.queue_max_size, g.queue_timeout),
            )
            # a reload may change the numbers; the queue and its in-flight count carry over
            adm.capacity, adm.queue_max, adm.timeout = (
                g.concurrent_requests,
                g.queue_max_size,
                g.queue_timeout,
            )
            self.admission = adm
            app[METRICS].add(
                "admission",
                lambda: {
                    "tollway_upstream_in_flight": (
                        "gauge",
                        "Upstream requests holding a slot.",
                        adm.in_flight,
                        (),
                    ),
                    "tollway_admission_queue_length": (
                        "gauge",
                        "Requests waiting for a slot.",
                        adm.queued,
                        (),
                    ),
                    "tollway_admission_rejected": (
                        "counter",
                        "Requests refused by the queue (503).",
                        adm.rejected,
                        (),
                    ),
                },
            )
        yield

    @hookimpl
    async def dashboard_figures(self) -> Figures | None:
        # requests waiting for a slot: the dashboard's autoscaling signal (scaling.queued)
        return Figures(queued=self.admission.queued) if self.admission is not None else None

    @hookimpl
    async def account_report(self, principal: Principal, month: str) -> dict[str, Any] | None:
        """The caller's monthly quota for ``GET /v1/tollway/usage``: the same count the
        quota check compares with (every instance's, on Redis). ``limit`` null: unlimited."""
        rule = self.tiers.get(principal.tier or "")
        if rule is None or self.quota is None:
            return None
        used = await self.quota.count(principal.user_id, month)
        start = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC).timestamp()
        reset = datetime.fromtimestamp(next_month_start(start), UTC)
        per_minute = rule.per_minute.amount if rule.per_minute is not None else None
        return {
            "quota": {
                "limit": rule.monthly,
                "used": used,
                "left": None if rule.monthly is None else max(0, rule.monthly - used),
                "resets_at": reset.isoformat().replace("+00:00", "Z"),
                "requests_per_minute": per_minute,
            }
        }

    def _open_windows(self, resources: Any) -> Windows:
        windows = open_windows(self.state_url, self.watch, self.config.exact_up_to)
        resources.on_close(windows.close)
        return windows

    def _open_quota(self, resources: Any) -> Quota:
        redis_url = self.state_url if self.distributed else None
        quota = open_quota(redis_url, self.quota_path, self.state_dir, self.watch)
        resources.on_close(quota.close)
        return quota

    def _layers(
        self, user: str, ip: str, rule: TierRule | None, key_rpm: tuple[str, int] | None = None
    ) -> BoundLayers:
        """The windows a request counts in; the same caller gets the same object back (its
        layers are built, and its counters looked up, only when the caller, its address or
        its plan is new). ``key_rpm``: (key id, requests per minute) of an API key with a
        rate of its own (``Principal.attrs["rpm"]``), a layer of that key alone."""
        tier = rule.name if rule is not None else None
        key: tuple[Any, ...] = (user, ip, tier) if key_rpm is None else (user, ip, tier, key_rpm)
        bound = self._layer_cache.get(key)
        if bound is None:
            layers: list[Layer] = [(a, p, ("ip", ip)) for a, p in self.ip_specs]
            layers += [(a, p, ("user", user)) for a, p in self.user_specs]
            if rule is not None and rule.per_minute is not None:
                layers.append((*_spec(rule.per_minute), ("plan", user)))
            if key_rpm is not None:
                period = float(max(1, round(self.tier_period)))  # as the plan's minute
                layers.append((key_rpm[1], period, ("key", key_rpm[0])))
            if len(self._layer_cache) >= LAYER_CACHE_SIZE:
                self._layer_cache.clear()
            bound = self._layer_cache[key] = BoundLayers(layers)
        return bound

    @staticmethod
    def _refusal(layer: Layer, wait: float, code: str | None = None) -> Reject:
        amount, period, ids = layer
        retry = max(1, math.ceil(wait))
        return Reject(
            429,
            f"Rate limit reached for requests ({ids[0]}: {amount} per {period:g}s). "
            f"Retry after {retry}s.",
            code=code or f"{ids[0]}_rate_limit_exceeded",
            headers={
                "Retry-After": str(retry),
                "x-ratelimit-limit-requests": str(amount),
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": reset_string(wait),
            },
        )

    @hookimpl
    async def access(self, ctx: RequestContext) -> None:
        assert self.limiter is not None and self.quota is not None
        principal = ctx.principal
        rule = self.tiers.get(principal.tier) if principal and principal.tier else None
        if principal and principal.tier and rule is None and self.tiers:
            raise Reject(403, f"plan {principal.tier!r} does not exist", code="unknown_plan")
        feature = ctx.feature
        if feature is not None and self.known_features and feature not in self.known_features:
            raise Reject(
                400, f"unknown feature {feature!r} in X-Tollway-Feature", code="unknown_feature"
            )
        if rule is not None and rule.features and feature not in rule.features:
            raise Reject(
                403,
                f"feature {feature!r} is not included in plan {rule.name!r}",
                code="feature_not_in_plan",
                param="X-Tollway-Feature",
            )
        user = principal.user_id if principal else "anonymous"
        billed = ctx.endpoint not in UNBILLED_ENDPOINTS  # counting: the rate layers only
        monthly = rule.monthly if rule is not None and billed else None
        if monthly is not None and rule is not None and rule.overage:
            monthly = OVERAGE_COUNT  # counted as ever, never refused: the invoice bills it
        quota = self.quota
        watch = self.watch
        if watch is not None and not watch.available and watch.refuse:
            raise watch.reject()  # state.on_unavailable: refuse
        taken = False  # a place in the quota, given back if a later layer refuses
        shared: QuotaPart | None = None  # a shared quota, taken in the rate layers' script
        if monthly is not None:
            now = time.time()
            month, reset = self.month.current(now)
            ok = quota.take_now(user, month, monthly)  # in process: a dict lookup, no await
            if ok is None:  # shared by instances: Redis takes the place atomically
                shared = quota.script_part(user, month, monthly)
                if shared is None:
                    ok = await quota.take(user, month, monthly)
            if shared is None:
                taken = bool(ok)
                if not ok:
                    raise _quota_refusal(rule, monthly, reset, now)
        try:
            if (
                rule is not None
                and rule.tokens is not None
                and billed
                and not await self.limiter.test(rule.tokens, "tokens", user)
            ):
                stats = await self.limiter.get_window_stats(rule.tokens, "tokens", user)
                wait = max(0.0, stats.reset_time - time.time())
                tokens_layer = (
                    rule.tokens.amount,
                    float(rule.tokens.get_expiry()),
                    ("tokens", user),
                )
                raise self._refusal(tokens_layer, wait, "plan_token_limit_exceeded")
            key_rpm = None
            if principal is not None and principal.attrs:  # an API key with its own rate
                rpm = principal.attrs.get("rpm")
                if rpm is not None and principal.key_id is not None:
                    key_rpm = (principal.key_id, rpm)
            bound = self._layers(user, ctx.client_ip, rule, key_rpm)
            layers = bound.layers
            if layers or shared is not None:
                limiter = self.limiter
                # in process: one synchronous pass, so no other request can interleave
                # between test and count
                res = limiter.admit_now(bound) if shared is None else None
                if res is None:  # on Redis: one script for every layer and the quota
                    res = await limiter.admit(bound, shared)
                    if shared is not None:
                        assert monthly is not None
                        if res.failed == UNDECIDED:  # Redis lost meanwhile: the quota first
                            if not await quota.take(user, month, monthly):
                                raise _quota_refusal(rule, monthly, reset, now)
                            taken = True
                            res = await limiter.admit(bound)
                        elif res.failed == QUOTA_REFUSED:
                            raise _quota_refusal(rule, monthly, reset, now)
                        elif res.failed < 0:
                            quota.taken(user, month, res.quota)
                            taken = True
                if res.failed >= 0:
                    raise self._refusal(layers[res.failed], res.wait)
                if res.layer >= 0:
                    ctx.stash[_RATE] = (layers[res.layer][0], res.remaining, res.wait)
            if watch is not None and not watch.available:  # decided without Redis
                if watch.refuse:
                    raise watch.reject()
                watch.affected()
        except Reject:
            if taken:
                await quota.give_back(user, month)
            raise
        if monthly is not None:
            ctx.stash[_COUNTED] = month
            alert_from = rule.alert_from if rule is not None else None
            if alert_from is not None:
                used = quota.count_now(user, month)
                if used >= alert_from:
                    self._quota_alert(user, month, used, rule)

    def _quota_alert(self, user: str, month: str, used: int, rule: TierRule | None) -> None:
        """Emit ``quota.threshold`` for each alert count ``used`` reached, once per user,
        percent and month in this process (the delivering side keeps it once across
        processes and instances: the dedupe ``quota:USER:MONTH:PERCENT``)."""
        if rule is None or self.events is None:
            return
        if month != self._alerted_month:
            self._alerted.clear()
            self._alerted_month = month
        for percent, count in rule.alerts:
            if used >= count and (user, percent) not in self._alerted:
                self._alerted.add((user, percent))
                self.events.emit(
                    Event(
                        "quota.threshold",
                        user,
                        f"quota:{user}:{month}:{percent}",
                        {
                            "percent": percent,
                            "used": used,
                            "quota": rule.monthly,
                            "month": month,
                            "plan": rule.name,
                        },
                    )
                )

    @hookimpl
    async def upstream_request(self, ctx: RequestContext, req: UpstreamRequest) -> None:
        principal = ctx.principal
        rule = self.tiers.get(principal.tier) if principal and principal.tier else None
        if rule is not None and rule.models is not None and ctx.route is not None:
            if ctx.route.model not in rule.models:
                raise Reject(
                    403,
                    f"model {ctx.route.model!r} is not included in plan {rule.name!r}",
                    code="model_not_in_plan",
                    param="model",
                )
        adm = self.admission
        if adm is None or _SLOT in ctx.stash:
            return  # a fallback's request runs this hook again: one admission slot a request
        if not adm.try_acquire():  # a free slot is taken without awaiting a coroutine
            # only a request that queues records its wait: the fast path stays untimed
            waited = time.perf_counter()
            try:
                await adm.acquire(rule.priority if rule else 0)
            except (QueueFull, QueueTimeout) as e:
                reason = "queue is full" if isinstance(e, QueueFull) else "queue wait timed out"
                ctx.timings.phase(
                    "limits.queue", waited, time.perf_counter(), {"tollway.admitted": False}
                )
                raise Reject(
                    503,
                    f"the gateway is overloaded ({reason}); retry shortly",
                    code="server_overloaded",
                    headers={"Retry-After": "1"},
                ) from None
            ctx.timings.phase("limits.queue", waited, time.perf_counter(), _ADMITTED)
        ctx.stash[_SLOT] = True

    @hookimpl
    async def response_headers(self, ctx: RequestContext, headers: dict[str, str]) -> None:
        rate = ctx.stash.get(_RATE)
        if rate is not None:  # OpenAI's names, so SDKs and clients read them as they are
            limit, remaining, wait = rate
            headers["x-ratelimit-limit-requests"] = str(limit)
            headers["x-ratelimit-remaining-requests"] = str(remaining)
            headers["x-ratelimit-reset-requests"] = reset_string(wait)

    @hookimpl
    async def forget_user(self, user_id: str) -> dict[str, int]:
        assert self.quota is not None
        return {"quota_months": await self.quota.forget(user_id)}

    @hookimpl
    async def log(self, ctx: RequestContext) -> None:
        if ctx.stash.get(_SLOT) and self.admission is not None:
            self.admission.release()
        month = ctx.stash.get(_COUNTED)
        principal = ctx.principal
        if principal is None:
            return
        quota = self.quota
        if month is not None and principal is not None and quota is not None:
            if ctx.status >= 400 and ctx.status != 499:  # failed requests are not billed
                await quota.give_back(principal.user_id, month)
        rule = self.tiers.get(principal.tier) if principal and principal.tier else None
        limiter = self.limiter  # "is not None": in-process windows without counters are falsy
        tokens = rule.tokens if rule is not None else None
        if (
            tokens is not None
            and ctx.usage.reported
            and limiter is not None
            and ctx.endpoint not in UNBILLED_ENDPOINTS  # a count's tokens are not generated
        ):
            cost = ctx.usage.input_tokens + ctx.usage.output_tokens
            if cost > 0 and not await limiter.hit(tokens, "tokens", principal.user_id, cost=cost):
                stats = await limiter.get_window_stats(tokens, "tokens", principal.user_id)
                if stats.remaining > 0:
                    await limiter.hit(tokens, "tokens", principal.user_id, cost=stats.remaining)
