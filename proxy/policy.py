"""Load and validate policies.yaml.

The policy is the product's whole configuration, so a mistake in it must be caught before it
serves a request, and reported where the operator can fix it: every error names its path and
line (``chain[1] (limits).config.user[0]: ... (line 24)``). Secrets are written as
``{$env: NAME}`` or ``{$file: path}`` and resolved once, at load. Unknown keys are rejected at
every level (a typo must not silently disable a limit).

Every error of a file is found in one run: the top level here (``read_text``), each plugin's
config in ``proxy.chain`` with the policy as its validation context (``policy_of``), so a
reference to another section is checked by the model that holds it and reported at its path.
A secret the machine does not have is a warning for ``tollway check``, an error to serve.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from proxy.context import Route

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, None: 1.0}


class PolicyError(Exception):
    """The policy is invalid; ``errors`` holds one line per problem, each with path and line."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


Loc = tuple[str | int, ...]
"""A path into the policy (or into the model being validated): keys and list indices."""


def errors_at(title: str, errors: Iterable[tuple[Loc, str]]) -> ValidationError:
    """Several errors of one validator, each at its own path relative to the model validated.

    A check across fields or sections (a model naming an unknown provider, a fallback naming
    an unknown model) runs in a validator of the model that holds the references. Raising
    this instead of one ValueError puts each finding at the path where it was written, so the
    loader gives it its line; pydantic nests the paths under the model's own.
    """
    return ValidationError.from_exception_data(
        title,
        [
            InitErrorDetails(
                # "{message}": a message holding braces (a placeholder '[{KIND}]') stays as is
                type=PydanticCustomError("value_error", "{message}", {"message": message}),
                loc=loc,
                input=None,
            )
            for loc, message in errors
        ],
    )


def parse_duration(value: Any) -> float:
    """Seconds from ``30``, ``"100ms"``, ``"1h"``, ``"7d"`` (a bare number is seconds)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 100ms, 30s, 1h or 7d")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ValueError(f"{value!r} is not a duration such as 100ms, 30s, 1h or 7d")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Seconds = Annotated[float, BeforeValidator(parse_duration)]
"""A duration field: seconds, or ``"100ms"``, ``"30s"``, ``"1h"``, ``"7d"`` (``parse_duration``).
Pydantic keeps the plain ``float`` as the field's annotation, so docs show its type as before."""


class Strict(BaseModel):
    """Base for every policy section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Encoding = Literal["gzip", "deflate"]
_ENCODINGS: tuple[Encoding, ...] = ("gzip", "deflate")


class Listen(Strict):
    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8080, ge=0, le=65535, description="TCP port to bind (0 picks a free one).")
    max_body_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1024,
        description="Largest request body accepted, counted after decompression; larger is a 413.",
    )
    request_encodings: list[Encoding] = Field(
        default_factory=lambda: list(_ENCODINGS),
        description="Content-Encodings accepted on request bodies (inflated with the "
        "max_body_bytes bound, sent to the provider plain); others are a 415. [] refuses all.",
    )
    header_timeout: Seconds = Field(
        10.0,
        gt=0,
        description="Seconds a client has to send a request's complete headers, counted from "
        "the connection's opening or the first byte of the request; then it is closed.",
    )
    keepalive_timeout: Seconds = Field(
        75.0, gt=0, description="Seconds an idle keep-alive connection is kept open."
    )
    shutdown_timeout: Seconds = Field(
        10.0,
        gt=0,
        description="Seconds SIGTERM/SIGINT lets in-flight requests finish before they are "
        "cancelled; closing the plugins then has as long again, and the process exits anyway.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Peer addresses/networks whose X-Forwarded-For is believed for the client IP.",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for net in v:
            ipaddress.ip_network(net, strict=False)  # ValueError names the bad entry
        return v


class Admin(Strict):
    key: SecretStr | None = Field(
        None, description="Bearer token for /admin; without it the admin API is disabled."
    )


class State(Strict):
    url: str = Field(
        "memory://", description="memory:// for one instance, redis://host:port/db to share state."
    )
    dir: str | None = Field(
        "data", description="Folder for embedded state (issued keys); null keeps it in memory."
    )
    on_unavailable: Literal["serve", "refuse"] = Field(
        "serve",
        description="While Redis is unreachable: serve (each instance enforces limits and "
        "quotas alone, answers keys from memory, bypasses the cache) or refuse (a limited "
        "request is a 503 state_unavailable with Retry-After).",
    )
    check_interval: Seconds = Field(
        1.0,
        gt=0,
        description="Seconds between an instance's checks of Redis: how soon it notices an "
        "outage's end or a restart that emptied Redis, and re-seeds it.",
    )

    @property
    def distributed(self) -> bool:
        """Whether the state lives in Redis, where several instances share it."""
        return self.url.startswith(("redis://", "rediss://"))


class Timeouts(Strict):
    connect: Seconds = Field(5.0, gt=0, description="Seconds to open a provider connection.")
    read: Seconds = Field(
        300.0, gt=0, description="Seconds to wait for the first byte and between stream chunks."
    )


class Retries(Strict):
    attempts: int = Field(2, ge=0, le=10, description="Retries after the first try (0 = none).")
    backoff: Seconds = Field(0.2, ge=0, description="Base of the exponential backoff, seconds.")
    max_backoff: Seconds = Field(8.0, ge=0, description="Cap on one wait, Retry-After included.")


class Provider(Strict):
    kind: Literal["openai", "anthropic"] = Field(description="The provider's API dialect.")
    base_url: str = Field(description="OpenAI: up to /v1. Anthropic: the host root.")
    api_key: SecretStr | None = Field(None, description="The provider credential Tollway injects.")
    timeout: Timeouts = Field(default_factory=Timeouts, description="Connect and read timeouts.")
    retries: Retries = Field(default_factory=Retries, description="Retries before the first byte.")
    anthropic_version: str = Field("2023-06-01", description="anthropic-version header default.")
    default_max_tokens: int = Field(
        4096, ge=1, description="max_tokens sent to Anthropic when an OpenAI client gave none."
    )
    forward_headers: list[str] = Field(
        default_factory=list,
        description="Provider-account headers a client may set on this provider (e.g. "
        "OpenAI-Project, anthropic-beta); without this they are dropped. Credentials, framing "
        "and Tollway's own headers can never be forwarded.",
    )

    responses: Literal["native", "chat"] = Field(
        "native",
        description="How /v1/responses reaches an OpenAI provider: native (it serves the "
        "Responses API: requests pass through) or chat (it serves only chat completions: "
        "requests and replies are translated). Anthropic providers are always translated.",
    )

    @field_validator("forward_headers")
    @classmethod
    def _forwardable(cls, v: list[str]) -> list[str]:
        from proxy.upstream import forwardable  # upstream imports this module: resolve late

        for name in v:
            forwardable(name)  # ValueError names the header and why it cannot be forwarded
        return [name.lower() for name in v]

    @model_validator(mode="after")
    def _responses_native_needs_openai(self) -> Provider:
        if self.kind == "anthropic" and "responses" in self.model_fields_set:
            if self.responses == "native":
                message = (
                    "native needs kind openai: an Anthropic provider has no Responses API "
                    "(its models answer /v1/responses translated)"
                )
                raise errors_at("Provider", [(("responses",), message)])
        return self


class Model(Strict):
    provider: str = Field(description="A key of providers:.")
    upstream_model: str | None = Field(None, description="The provider's name, if different.")
    custom: bool = Field(False, description="Only tiers with the custom_models perk may use it.")
    dedicated_provider: str | None = Field(
        None, description="The provider serving tiers with the dedicated_instances perk."
    )
    input_per_mtok: float | None = Field(None, ge=0, description="USD per million input tokens.")
    output_per_mtok: float | None = Field(None, ge=0, description="USD per million output tokens.")


class Feature(Strict):
    price_per_request: float = Field(0.0, ge=0, description="USD charged per request.")


Perk = Literal["priority_support", "custom_models", "dedicated_instances", "sla_guarantee"]
"""Tier attributes with behaviour: an earlier place in the admission queue, models marked
``custom``, the models' ``dedicated_provider``, and the ``sla`` view of the usage database."""


class Budget(Strict):
    """A monthly spending limit in money (``plugins.budgets``)."""

    usd: float = Field(gt=0, description="USD a user may spend per calendar month (UTC).")
    basis: Literal["price", "cost"] = Field(
        "price",
        description="What is counted: price (what the customer is billed per request, "
        "price_usd) or cost (what the providers charge for the tokens, cost_usd).",
    )
    alerts: list[int] = Field(
        default_factory=lambda: [50, 80, 100],
        description="Percents of the budget whose crossing emits a budget.threshold event.",
    )
    hard: bool = Field(
        True,
        description="true: a request that would pass the budget is refused (402 "
        "budget_exceeded); false: only the alerts.",
    )

    @field_validator("alerts")
    @classmethod
    def _percents(cls, v: list[int]) -> list[int]:
        for pct in v:
            if not 1 <= pct <= 1000:
                raise ValueError(f"{pct} is not a percent from 1 to 1000")
        return sorted(set(v))


class Overage(Strict):
    """Requests past the monthly quota go on and are billed, instead of a 429."""

    price_per_request: float = Field(
        0.0, ge=0, description="USD per request past the monthly quota (an invoice line)."
    )
    price_per_mtok: float = Field(
        0.0,
        ge=0,
        description="USD per million tokens (input + output) of requests past the quota.",
    )


class Tier(Strict):
    requests_per_month: int | Literal["unlimited"] = Field(
        "unlimited", description="Monthly request quota (calendar month, UTC)."
    )
    requests_per_minute: int | None = Field(None, ge=1, description="Per-minute limit of the tier.")
    tokens_per_minute: int | None = Field(None, ge=1, description="Optional tokens per minute.")
    monthly_cost: float = Field(0.0, ge=0, description="Subscription price, USD per month.")
    features: list[str] = Field(default_factory=list, description="Request types of this tier.")
    includes: str | None = Field(None, description="A tier whose features this tier inherits.")
    perks: list[Perk] = Field(
        default_factory=list,
        description="priority_support, custom_models, dedicated_instances, sla_guarantee.",
    )
    models: list[str] | None = Field(None, description="Allowed models; None allows all.")
    priority: int = Field(0, description="Admission-queue priority; higher is admitted first.")
    prices: dict[str, float] = Field(
        default_factory=dict, description="Per-feature price overrides (USD per request)."
    )
    budget: Budget | None = Field(
        None, description="Monthly money budget of each user of the tier (budgets plugin)."
    )
    overage: Overage | None = Field(
        None,
        description="Bill requests past requests_per_month instead of refusing them (429).",
    )


class ChainItem(Strict):
    name: str = Field(description="A built-in plugin or an entry point of group 'tollway'.")
    enabled: bool = Field(True, description="False keeps the entry but skips the plugin.")
    config: dict[str, Any] = Field(default_factory=dict, description="The plugin's own config.")


class Policy(Strict):
    """The whole policies.yaml, validated; ``routes`` is derived for the hot path."""

    version: Literal[1] = Field(1, description="Policy format version.")
    listen: Listen = Field(default_factory=Listen)
    admin: Admin = Field(default_factory=Admin)
    state: State = Field(default_factory=State)
    providers: dict[str, Provider] = Field(default_factory=dict)
    models: dict[str, Model] = Field(default_factory=dict)
    default_feature: str | None = Field(
        "basic_suggestions", description="The feature of a request without X-Tollway-Feature."
    )
    features: dict[str, Feature] = Field(default_factory=dict)
    tiers: dict[str, Tier] = Field(default_factory=dict)
    chain: list[ChainItem] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references_resolve(self) -> Policy:
        errors = self.reference_errors()
        if errors:
            raise errors_at("Policy", errors)
        return self

    def reference_errors(self) -> list[tuple[Loc, str]]:
        """Names one section uses that another does not declare, each at its path.

        Only fields an entry sets are read: the loader's stand-in for an invalid entry sets
        only its fields of the right type, so a broken value is not reported twice.
        """
        errors: list[tuple[Loc, str]] = []
        for name, m in self.models.items():
            for field in ("provider", "dedicated_provider"):
                ref = getattr(m, field) if field in m.model_fields_set else None
                if ref is not None and ref not in self.providers:
                    errors.append((("models", name, field), f"unknown provider {ref!r}"))
        for name, t in self.tiers.items():
            if "includes" in t.model_fields_set and t.includes is not None:
                if t.includes not in self.tiers:
                    errors.append((("tiers", name, "includes"), f"unknown tier {t.includes!r}"))
        return errors

    def routes(self, dedicated: bool = False) -> dict[str, Route]:
        """Client model name -> Route, computed once per policy load. ``dedicated``: only the
        models with a ``dedicated_provider``, routed there (tiers with that perk)."""
        out = {}
        for name, m in self.models.items():
            provider = m.dedicated_provider if dedicated else m.provider
            if provider is None:
                continue
            out[name] = Route(
                model=name,
                provider=provider,
                upstream_model=m.upstream_model or name,
                kind=self.providers[provider].kind,
                input_per_mtok=m.input_per_mtok,
                output_per_mtok=m.output_per_mtok,
                native_responses=self.providers[provider].kind == "openai"
                and self.providers[provider].responses == "native",
            )
        return out

    def allowed_models(self, tier: str) -> frozenset[str] | None:
        """The models a tier may use: its ``models`` list (None: all), less the models marked
        ``custom`` unless the tier has the custom_models perk."""
        t = self.tiers[tier]
        custom = {n for n, m in self.models.items() if m.custom}
        if not custom or "custom_models" in t.perks:
            return frozenset(t.models) if t.models is not None else None
        base = set(t.models) if t.models is not None else set(self.models)
        return frozenset(base - custom)

    def tiers_with(self, perk: Perk) -> frozenset[str]:
        """The tiers that have ``perk``."""
        return frozenset(name for name, t in self.tiers.items() if perk in t.perks)

    def tier_costs(self) -> dict[str, float]:
        """Each tier's subscription price (USD per month): MRR and invoices."""
        return {name: t.monthly_cost for name, t in self.tiers.items()}

    def priority(self, tier: str) -> int:
        """Admission-queue priority: the tier's, at least 1 with the priority_support perk."""
        t = self.tiers[tier]
        return max(t.priority, 1) if "priority_support" in t.perks else t.priority


def validation_context(policy: Policy) -> dict[str, Any]:
    """The pydantic validation context a plugin's config is validated with (``policy_of``)."""
    return {"policy": policy}


def policy_of(info: ValidationInfo) -> Policy | None:
    """The policy a plugin's config is validated against, for a validator that checks what
    the config names in other sections (models, tiers) or needs from them (``state.url``).

    None when a config is validated on its own (a unit test, ``tollway meter``): such checks
    are then skipped. When the policy has errors of its own this is a stand-in that declares
    every name the file declares (an invalid entry with its fields of the right type), so a
    config is checked in the same run and a broken entry is not reported again as unknown
    wherever it is named.
    """
    context = info.context
    policy = context.get("policy") if isinstance(context, dict) else None
    return policy if isinstance(policy, Policy) else None


_NAMED: dict[str, type[Strict]] = {
    "providers": Provider,
    "models": Model,
    "features": Feature,
    "tiers": Tier,
}
"""Sections whose entries other sections name: a stand-in keeps every entry's name."""


def _stand_in(data: dict[str, Any]) -> Policy:
    """The policy as far as it is valid, for checking the rest of a file that has errors.

    Each section that validates is used as it is. Of an invalid section or entry, what has
    the right type is kept and the rest takes its default, so every name the file declares
    is there and ``state.url`` is the one written. Not validated as a whole (its references
    are checked by ``reference_errors``), and never served.
    """
    fields: dict[str, Any] = {}
    for name, info in Policy.model_fields.items():
        if name not in data:
            continue
        fitting = _fitting(info.annotation, data[name])
        if fitting is not _UNFIT:
            fields[name] = fitting
        elif isinstance(data[name], dict) and name in _NAMED:
            fields[name] = {k: _partial(_NAMED[name], v) for k, v in data[name].items()}
        elif isinstance(data[name], dict) and isinstance(info.annotation, type):
            if issubclass(info.annotation, Strict):
                fields[name] = _partial(info.annotation, data[name])
    return Policy.model_construct(**fields)


_UNFIT = object()


def _fitting(annotation: Any, value: Any) -> Any:
    """``value`` validated as ``annotation``, or ``_UNFIT``."""
    if annotation is None:
        return _UNFIT
    try:
        return TypeAdapter(annotation).validate_python(value)
    except ValidationError:
        return _UNFIT


def _partial(model: type[Strict], value: Any) -> Strict:
    """``model`` from ``value``: validated, or (invalid) built from the fields of the right
    type alone; the fields it sets are the ones ``reference_errors`` reads."""
    try:
        return model.model_validate(value)
    except ValidationError:
        pass
    fields: dict[str, Any] = {}
    for key, raw in value.items() if isinstance(value, dict) else ():
        info = model.model_fields.get(key) if isinstance(key, str) else None
        fitting = _fitting(info.annotation if info is not None else None, raw)
        if fitting is not _UNFIT:
            fields[key] = fitting
    return model.model_construct(**fields)


# ---- YAML with line numbers -------------------------------------------------------------


class _Lines:
    """Maps a path of keys/indices to the line it was written on."""

    def __init__(self) -> None:
        self.by_path: dict[tuple[Any, ...], int] = {}

    def line(self, path: tuple[Any, ...]) -> int | None:
        while path:
            if path in self.by_path:
                return self.by_path[path]
            path = path[:-1]
        return self.by_path.get(())


UNSET_SECRET = ""
"""What an unresolved secret reads as while the rest of the file is checked: a value, so a
check that a secret is configured (a shared cache's key) sees it configured. Errors at its
own path are dropped: the missing secret is the one thing reported there."""


def _construct(
    node: yaml.Node,
    path: tuple[Any, ...],
    lines: _Lines,
    ctor: yaml.constructor.SafeConstructor,
    base: Path,
    unset: dict[tuple[Any, ...], str],
) -> Any:
    lines.by_path[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
        if keys and keys[0] in ("$env", "$file") and len(node.value) == 1:
            return _secret(keys[0], node.value[0][1], path, base, unset)
        out: dict[Any, Any] = {}
        for knode, vnode in node.value:
            key = ctor.construct_object(knode)
            out[key] = _construct(vnode, (*path, key), lines, ctor, base, unset)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _construct(v, (*path, i), lines, ctor, base, unset) for i, v in enumerate(node.value)
        ]
    return ctor.construct_object(node)


def _secret(
    kind: str, node: yaml.Node, path: tuple[Any, ...], base: Path, unset: dict[Any, str]
) -> str:
    """The secret's value; an unresolved one is recorded in ``unset`` (path -> why)."""
    ref = str(node.value) if isinstance(node, yaml.ScalarNode) else ""
    if kind == "$env":
        value = os.environ.get(ref)
        if value is None:
            unset[path] = f"environment variable {ref} is not set"
            return UNSET_SECRET
        return value
    p = Path(ref).expanduser()
    if not p.is_absolute():
        p = base / p
    try:
        return p.read_text().strip()
    except OSError as e:
        unset[path] = f"cannot read secret file {ref}: {e.strerror}"
        return UNSET_SECRET


def _fmt_path(loc: tuple[Any, ...], data: Any) -> str:
    out = ""
    node = data
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            if loc[:i] == ("chain",) and isinstance(node, list) and part < len(node):
                item = node[part]
                if isinstance(item, dict) and isinstance(item.get("name"), str):
                    out += f" ({item['name']})"
        else:
            out += f".{part}" if out else str(part)
        node = node[part] if isinstance(node, dict | list) and _has(node, part) else None
    return out or "(top level)"


def _has(node: Any, part: Any) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(part, int) and 0 <= part < len(node)


_PREFIXES = ("Value error, ", "Assertion failed, ")
"""What pydantic puts before the message of a ValueError/AssertionError a validator raised."""


def format_validation_error(
    exc: ValidationError,
    data: Any,
    lines: _Lines,
    prefix: tuple[Any, ...] = (),
    unset: Iterable[tuple[Any, ...]] = (),
) -> list[str]:
    """One ``path: message (line N)`` per path with errors, in the order of the file (a value
    that fits no member of a union has one error per member: they are joined). Errors at the
    path of an ``unset`` secret are left out: that the secret is missing is what is wrong."""
    return [text for _, text in _located(exc, data, lines, prefix, unset)]


def _located(
    exc: ValidationError,
    data: Any,
    lines: _Lines,
    prefix: tuple[Any, ...] = (),
    unset: Iterable[tuple[Any, ...]] = (),
) -> list[tuple[int, str]]:
    """``format_validation_error`` with each error's line, sorted by it."""
    unset = tuple(unset)
    by_path: dict[tuple[Any, ...], list[str]] = {}
    for err in exc.errors():
        loc = prefix + tuple(p for p in err["loc"] if not str(p).startswith("function-"))
        # pydantic adds the union member's name to the location ("int", "literal[...]").
        loc = tuple(
            p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("int", "str")))
        )
        if any(_within(loc, secret) for secret in unset):
            continue
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        for text in _PREFIXES:
            msg = msg.removeprefix(text)
        messages = by_path.setdefault(loc, [])
        if msg not in messages:
            messages.append(msg)
    located = [
        (lines.line(loc) or 0, _format(loc, "; ".join(msgs), data, lines))
        for loc, msgs in by_path.items()
    ]
    return sorted(located, key=lambda found: found[0])


def _within(loc: tuple[Any, ...], secret: tuple[Any, ...]) -> bool:
    """Whether an error at ``loc`` is about the secret at ``secret``: at or under its path,
    or at the list holding it (a validator of a whole list reports at the list)."""
    if loc[: len(secret)] == secret:
        return True
    return bool(secret) and isinstance(secret[-1], int) and loc == secret[:-1]


def _format(loc: tuple[Any, ...], message: str, data: Any, lines: _Lines) -> str:
    line = lines.line(loc)
    return f"{_fmt_path(loc, data)}: {message}" + (f" (line {line})" if line else "")


class LoadedPolicy:
    """A policy file read: the policy, the raw data and its line map (plugins validate their
    config later, ``proxy.chain``), and what reading it found wrong.

    ``load_text``/``load_file`` return only valid policies. ``read_text``/``read_file``
    return a policy with its ``errors`` (then ``policy`` is a stand-in, never to be served)
    so the chain's configs are checked in the same run; with optional secrets, a missing
    one is a ``warning`` and its path is in ``unset``.
    """

    def __init__(
        self,
        policy: Policy,
        data: dict[str, Any],
        lines: _Lines,
        path: Path | None,
        *,
        errors: list[str] | None = None,
        warnings: list[str] | None = None,
        unset: frozenset[tuple[Any, ...]] = frozenset(),
    ):
        self.policy = policy
        self.data = data
        self.lines = lines
        self.path = path
        self.errors = errors or []
        self.warnings = warnings or []
        self.unset = unset

    def error(self, loc: tuple[Any, ...], message: str) -> str:
        """``path: message (line N)`` for a problem found at ``loc``."""
        return _format(loc, message, self.data, self.lines)

    def config_errors(self, index: int, exc: ValidationError) -> list[str]:
        """Errors of ``chain[index].config`` with paths and lines."""
        prefix = ("chain", index, "config")
        return format_validation_error(exc, self.data, self.lines, prefix, self.unset)

    def chain_items(self) -> list[tuple[int, ChainItem]]:
        """The chain's items with their index in the file. When the policy has errors: the
        items that are valid by themselves (the others' errors are among ``errors``)."""
        if not self.errors:
            return list(enumerate(self.policy.chain))
        raw = self.data.get("chain")
        out = []
        for index, item in enumerate(raw if isinstance(raw, list) else []):
            try:
                out.append((index, ChainItem.model_validate(item)))
            except ValidationError:
                continue
        return out

    def has_unset(self, loc: tuple[Any, ...]) -> bool:
        """Whether a secret at or under ``loc`` is unresolved (optional secrets only)."""
        return any(secret[: len(loc)] == loc for secret in self.unset)


def read_text(
    text: str,
    *,
    base: Path | None = None,
    path: Path | None = None,
    secrets_required: bool = True,
) -> LoadedPolicy:
    """Parse and validate policy YAML text, collecting every problem of the top level.

    Raises PolicyError only when there is nothing to check (invalid YAML, not a mapping).
    ``secrets_required=False`` (``tollway check`` on a machine without the secrets): a
    secret that cannot be resolved is a warning, and the rest is checked as if it were set.
    """
    base = base or Path.cwd()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise PolicyError([f"invalid YAML{where}: {getattr(e, 'problem', e)}"]) from None
    if root is None:
        raise PolicyError(["the policy is empty"])
    lines = _Lines()
    unset: dict[tuple[Any, ...], str] = {}
    data = _construct(root, (), lines, yaml.constructor.SafeConstructor(), base, unset)
    if not isinstance(data, dict):
        raise PolicyError(["the policy must be a mapping of sections"])
    missing = [
        (lines.by_path[p], f"{_fmt_path(p, data)} (line {lines.by_path[p]}): {why}")
        for p, why in unset.items()
    ]
    found, warnings = (missing, []) if secrets_required else ([], [m for _, m in missing])
    try:
        policy = Policy.model_validate(data)
    except ValidationError as e:
        found.extend(_located(e, data, lines, unset=unset))
        policy = _stand_in(data)
        # the references of the valid part: pydantic checks them only when all of it is valid
        for loc, message in policy.reference_errors():
            found.append((lines.line(loc) or 0, _format(loc, message, data, lines)))
    errors = list(dict.fromkeys(text for _, text in sorted(found, key=lambda f: f[0])))
    return LoadedPolicy(
        policy, data, lines, path, errors=errors, warnings=warnings, unset=frozenset(unset)
    )


def load_text(text: str, *, base: Path | None = None, path: Path | None = None) -> LoadedPolicy:
    """Parse and validate policy YAML text; raise PolicyError with every problem found."""
    loaded = read_text(text, base=base, path=path)
    if loaded.errors:
        raise PolicyError(loaded.errors)
    return loaded


WORKER_STATE_DIR: str | None = None
"""Set once by a worker of ``tollway serve --workers`` (``worker-K``): every policy it reads
from its file, a reload's included, keeps its embedded state in this folder under
``state.dir``, so ``keys.json``, ``quota.json`` and ``instance-id`` each have one writer."""


def read_file(path: str | Path, *, secrets_required: bool = True) -> LoadedPolicy:
    """``read_text`` of a file; relative ``$file`` secrets resolve against its folder."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise PolicyError([f"{p}: {e.strerror}"]) from None
    loaded = read_text(text, base=p.resolve().parent, path=p, secrets_required=secrets_required)
    state = loaded.policy.state
    if WORKER_STATE_DIR is not None and state.dir is not None:
        own = state.model_copy(update={"dir": str(Path(state.dir) / WORKER_STATE_DIR)})
        loaded.policy = loaded.policy.model_copy(update={"state": own})
    return loaded


def load_file(path: str | Path) -> LoadedPolicy:
    """Load a policy file; relative ``$file`` secrets resolve against the file's folder."""
    loaded = read_file(path)
    if loaded.errors:
        raise PolicyError(loaded.errors)
    return loaded
