"""routing: ``model: auto`` picks a cheap or a strong model by the request's complexity, and
each model may name fallbacks that serve when its provider fails.

Complexity is scored from what the request says about itself, in points, with no model call
and no tokenizer (it runs on every ``auto`` request, so it must cost microseconds):

- prompt size: a point per ``long_prompt_tokens`` of estimated prompt tokens (characters / 4,
  system prompt and every message counted), at most two;
- code: a fenced block (```) or ``code_lines`` lines that look like code;
- reasoning: one of ``keywords`` in what the user wrote (analyse, prove, step by step, ...);
- structure: tools, functions or a JSON schema response format;
- a long conversation: ``turns`` messages or more;
- a long answer asked for: ``max_tokens`` of ``long_output_tokens`` or more.

At ``strong_at`` points the strong model serves, below it the cheap one. A tier that does not
allow the chosen model (``tiers.<tier>.models``) gets the other one when it allows that. The
decision is reported in ``X-Tollway-Route`` (``strong; score=3; prompt,code``) and the model in
``X-Tollway-Model``; usage is metered and priced as the model that served.

A tier with the ``dedicated_instances`` perk is served by a model's ``dedicated_provider``
(``models.NAME.dedicated_provider``) where it has one: its own provider route.

Fallbacks (``fallbacks: {gpt-5.5: [claude-sonnet]}``) are set on the request as
``ctx.fallbacks`` and carried out by the core: when the provider answers a status in
``proxy.upstream.FALLBACK_STATUSES`` after its retries, or cannot be reached or times out, the
next route is called in its own dialect. Fallbacks outside the caller's tier are left out.
Embeddings requests get none: a merged embeddings call serves several callers, and another
model's vectors would not be comparable with the ones the caller already has.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from proxy.appkeys import METRICS
from proxy.context import RequestContext, Route, StashKey
from proxy.errors import Reject
from proxy.hookspecs import hookimpl
from proxy.policy import Loc, Policy, errors_at, policy_of
from proxy.texts import texts_of

DEFAULT_KEYWORDS = (
    "analyze",
    "analyse",
    "architecture",
    "compare",
    "debug",
    "design",
    "derive",
    "explain why",
    "optimize",
    "optimise",
    "proof",
    "prove",
    "reason",
    "refactor",
    "step by step",
    "trade-off",
    "tradeoff",
)

# a line that looks like code: a statement ending, a block opener, a definition, an assignment
_CODE_LINE = re.compile(
    r"(;\s*$|[{}]\s*$|^\s*(def|class|function|fn|func|import|from|return|if|for|while|const|let|"
    r"var|public|private|#include|SELECT|select)\b|^\s*[\w.\[\]]+\s*=[^=])",
    re.MULTILINE,
)

_FIRST: StashKey[Route] = StashKey()  # the route before any fallback
_CHOICE: StashKey[str] = StashKey()  # model auto's choice and why: the X-Tollway-Route header


class AutoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field("auto", description="The model name that asks for automatic routing.")
    cheap: str = Field(description="The model for simple requests (a key of models:).")
    strong: str = Field(description="The model for complex requests (a key of models:).")
    strong_at: int = Field(2, ge=1, description="Points at which the strong model serves.")
    long_prompt_tokens: int = Field(
        1000, ge=1, description="Estimated prompt tokens (chars / 4) worth a point (two at most)."
    )
    long_output_tokens: int = Field(
        1000, ge=1, description="max_tokens at or above this is worth a point."
    )
    turns: int = Field(6, ge=1, description="This many messages or more is worth a point.")
    code_lines: int = Field(3, ge=1, description="Lines that look like code worth a point.")
    keywords: list[str] = Field(
        default_factory=lambda: list(DEFAULT_KEYWORDS),
        description="Words asking for reasoning; any of them in the user's text is a point.",
    )

    @field_validator("cheap", "strong")
    @classmethod
    def _a_model(cls, v: str, info: ValidationInfo) -> str:
        policy = policy_of(info)
        if policy is not None and v not in policy.models:
            raise ValueError(f"unknown model {v!r} (not in models:)")
        return v

    @field_validator("name")
    @classmethod
    def _not_a_model(cls, v: str, info: ValidationInfo) -> str:
        policy = policy_of(info)
        if policy is not None and v in policy.models:
            raise ValueError(f"{v!r} is a model of models:; pick another")
        return v


class RoutingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    auto: AutoConfig | None = Field(None, description="Automatic cheap/strong model choice.")
    fallbacks: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Model -> models to try in order when its provider fails.",
    )

    @model_validator(mode="after")
    def _fallbacks_are_models(self, info: ValidationInfo) -> RoutingConfig:
        policy = policy_of(info)
        known = policy.models if policy is not None else None
        errors: list[tuple[Loc, str]] = []
        for model, others in self.fallbacks.items():
            if model in others:
                errors.append((("fallbacks", model), "a model cannot be its own fallback"))
            if known is not None:
                errors.extend(
                    (("fallbacks", model), f"unknown model {name!r} (not in models:)")
                    for name in [model, *others]
                    if name not in known
                )
        if errors:
            raise errors_at("RoutingConfig", errors)
        return self


def prompt_texts(body: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(every text of the prompt, what the user wrote) for chat, messages, completions and
    Responses (``instructions``; ``input``: a string, messages and tool outputs)."""
    texts: list[str] = []
    user: list[str] = []
    system = body.get("system")
    if system is not None:
        texts.extend(texts_of(system))
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        texts.append(instructions)
    messages = body.get("messages")
    if not isinstance(messages, list):
        messages = body.get("input")
        if isinstance(messages, str):
            texts.append(messages)
            user.append(messages)
    if isinstance(messages, list):
        for m in messages:
            if not isinstance(m, dict):
                continue
            if m.get("type") == "function_call_output":
                texts.extend(texts_of(m.get("output")))
                continue
            t = texts_of(m.get("content"))
            texts.extend(t)
            if m.get("role") == "user":
                user.extend(t)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        texts.append(prompt)
        user.append(prompt)
    elif isinstance(prompt, list):
        parts = [p for p in prompt if isinstance(p, str)]
        texts.extend(parts)
        user.extend(parts)
    return texts, user


class Scorer:
    """The complexity score of a request; see the module docstring for the points."""

    def __init__(self, cfg: AutoConfig) -> None:
        self.cfg = cfg
        words = sorted({k.lower() for k in cfg.keywords if k.strip()}, key=len, reverse=True)
        self.keywords = (
            re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")", re.IGNORECASE)
            if words
            else None
        )

    def score(self, body: dict[str, Any]) -> tuple[int, list[str]]:
        cfg = self.cfg
        texts, user = prompt_texts(body)
        points = 0
        reasons: list[str] = []
        size = min(2, (sum(map(len, texts)) // 4) // cfg.long_prompt_tokens)
        if size:
            points += size
            reasons.append("prompt")
        joined = "\n".join(texts)
        if "```" in joined or len(_CODE_LINE.findall(joined)) >= cfg.code_lines:
            points += 1
            reasons.append("code")
        if self.keywords is not None and any(self.keywords.search(t) for t in user):
            points += 1
            reasons.append("reasoning")
        fmt = body.get("response_format")
        text = body.get("text")  # Responses: text.format
        if fmt is None and isinstance(text, dict):
            fmt = text.get("format")
        if (
            body.get("tools")
            or body.get("functions")
            or (isinstance(fmt, dict) and fmt.get("type") == "json_schema")
        ):
            points += 1
            reasons.append("tools")
        messages = body.get("messages") or body.get("input")
        if isinstance(messages, list) and len(messages) >= cfg.turns:
            points += 1
            reasons.append("turns")
        max_tokens = (
            body.get("max_tokens")
            or body.get("max_completion_tokens")
            or body.get("max_output_tokens")
        )
        if isinstance(max_tokens, int) and max_tokens >= cfg.long_output_tokens:
            points += 1
            reasons.append("output")
        return points, reasons


class RoutingPlugin:
    """Chooses the route of ``auto`` requests and sets every request's fallbacks."""

    Config = RoutingConfig

    def __init__(self, config: RoutingConfig, policy: Policy) -> None:
        auto = config.auto
        self.config = config
        self.routes = policy.routes()
        self.allowed = {name: policy.allowed_models(name) for name in policy.tiers}
        # tiers with the dedicated_instances perk: models with a dedicated_provider go there
        self.dedicated_tiers = policy.tiers_with("dedicated_instances")
        self.dedicated = policy.routes(dedicated=True)
        self.scorer = Scorer(auto) if auto is not None else None
        self.fallbacks = {
            model: tuple(self.routes[m] for m in others)
            for model, others in config.fallbacks.items()
        }
        self.auto_requests = {"cheap": 0, "strong": 0}
        self.fallbacks_taken = 0

    @hookimpl
    def model_names(self) -> tuple[str, ...]:
        # the auto model: GET /v1/models lists it beside the policy's models
        return (self.config.auto.name,) if self.config.auto is not None else ()

    @hookimpl
    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        app[METRICS].add(
            "routing",
            lambda: {
                "tollway_auto_routed": (
                    "counter",
                    "Requests for the auto model, by the model class chosen.",
                    {(k,): v for k, v in self.auto_requests.items()},
                    ("choice",),
                ),
                "tollway_fallbacks": (
                    "counter",
                    "Requests whose provider failed and that went on to a fallback route.",
                    self.fallbacks_taken,
                    (),
                ),
            },
        )
        yield

    @hookimpl
    async def access(self, ctx: RequestContext) -> None:
        auto = self.config.auto
        principal = ctx.principal
        tier = principal.tier if principal is not None else None
        allowed = self.allowed.get(tier) if tier is not None else None
        if auto is not None and ctx.model == auto.name and self.scorer is not None:
            if ctx.endpoint == "embeddings":
                raise Reject(
                    400,
                    f"model {auto.name!r} chooses among chat models; /v1/embeddings needs a "
                    "named embeddings model",
                    code="invalid_model",
                    param="model",
                )
            points, reasons = self.scorer.score(ctx.body)
            choice = "strong" if points >= auto.strong_at else "cheap"
            other = "cheap" if choice == "strong" else "strong"
            name = getattr(auto, choice)
            if allowed is not None and name not in allowed and getattr(auto, other) in allowed:
                choice, name = other, getattr(auto, other)
            self.auto_requests[choice] += 1
            ctx.route = self.routes[name]
            why = ",".join(reasons) or "-"
            ctx.stash[_CHOICE] = f"{choice}; score={points}; {why}"
        route = ctx.route
        if route is None:
            return
        if tier is not None and tier in self.dedicated_tiers:
            route = self.dedicated.get(route.model, route)
            ctx.route = route
        if ctx.endpoint == "embeddings":
            return
        fallbacks = self.fallbacks.get(route.model)
        if fallbacks:
            if allowed is not None:
                fallbacks = tuple(r for r in fallbacks if r.model in allowed)
            ctx.fallbacks = fallbacks
            ctx.stash[_FIRST] = route

    @hookimpl
    async def response_headers(self, ctx: RequestContext, headers: dict[str, str]) -> None:
        choice = ctx.stash.get(_CHOICE)
        if choice is not None:
            headers["X-Tollway-Route"] = choice

    @hookimpl
    async def log(self, ctx: RequestContext) -> None:
        first = ctx.stash.get(_FIRST)
        if first is not None and ctx.route is not first:
            self.fallbacks_taken += 1
