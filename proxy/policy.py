"""Load and validate policies.yaml.

The policy is the product's whole configuration, so a mistake in it must be caught before it
serves a request, and reported where the operator can fix it: every error names its path and
line (``chain[1] (limits).config.user[0]: ... (line 24)``). Secrets are written as
``{$env: NAME}`` or ``{$file: path}`` and resolved once, at load. Unknown keys are rejected at
every level (a typo must not silently disable a limit).
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from proxy.context import Route

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, None: 1.0}


class PolicyError(Exception):
    """The policy is invalid; ``errors`` holds one line per problem, each with path and line."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


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
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a client has to send a request's complete headers, counted from "
        "the connection's opening or the first byte of the request; then it is closed.",
    )
    keepalive_timeout: float = Field(
        75.0, gt=0, description="Seconds an idle keep-alive connection is kept open."
    )
    shutdown_timeout: float = Field(
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

    @field_validator("header_timeout", "keepalive_timeout", "shutdown_timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)


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
    check_interval: float = Field(
        1.0,
        gt=0,
        description="Seconds between an instance's checks of Redis: how soon it notices an "
        "outage's end or a restart that emptied Redis, and re-seeds it.",
    )

    @field_validator("check_interval", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)

    @property
    def shared(self) -> bool:
        """Whether the state lives in Redis, where several instances share it."""
        return self.url.startswith(("redis://", "rediss://"))


class Timeouts(Strict):
    connect: float = Field(5.0, gt=0, description="Seconds to open a provider connection.")
    read: float = Field(
        300.0, gt=0, description="Seconds to wait for the first byte and between stream chunks."
    )

    @field_validator("connect", "read", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)


class Retries(Strict):
    attempts: int = Field(2, ge=0, le=10, description="Retries after the first try (0 = none).")
    backoff: float = Field(0.2, ge=0, description="Base of the exponential backoff, seconds.")
    max_backoff: float = Field(8.0, ge=0, description="Cap on one wait, Retry-After included.")

    @field_validator("backoff", "max_backoff", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)


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

    @field_validator("forward_headers")
    @classmethod
    def _forwardable(cls, v: list[str]) -> list[str]:
        from proxy.upstream import forwardable  # upstream imports this module: resolve late

        for name in v:
            forwardable(name)  # ValueError names the header and why it cannot be forwarded
        return [name.lower() for name in v]


class Model(Strict):
    provider: str = Field(description="A key of providers:.")
    upstream_model: str | None = Field(None, description="The provider's name, if different.")
    custom: bool = Field(False, description="Only plans with the custom_models perk may use it.")
    dedicated_provider: str | None = Field(
        None, description="The provider serving plans with the dedicated_instances perk."
    )
    input_per_mtok: float | None = Field(None, ge=0, description="USD per million input tokens.")
    output_per_mtok: float | None = Field(None, ge=0, description="USD per million output tokens.")


class Feature(Strict):
    price_per_request: float = Field(0.0, ge=0, description="USD charged per request.")
    cache: bool = Field(True, description="Whether replies for this feature may be cached.")


Perk = Literal["priority_support", "custom_models", "dedicated_instances", "sla_guarantee"]
"""Plan attributes with behaviour: an earlier place in the admission queue, models marked
``custom``, the models' ``dedicated_provider``, and the ``sla`` view of the usage database."""


class Tier(Strict):
    requests_per_month: int | Literal["unlimited"] = Field(
        "unlimited", description="Monthly request quota (calendar month, UTC)."
    )
    requests_per_minute: int | None = Field(None, ge=1, description="Per-minute limit of the plan.")
    tokens_per_minute: int | None = Field(None, ge=1, description="Optional tokens per minute.")
    monthly_cost: float = Field(0.0, ge=0, description="Subscription price, USD per month.")
    features: list[str] = Field(default_factory=list, description="Request types of this plan.")
    includes: str | None = Field(None, description="A plan whose features this plan inherits.")
    perks: list[Perk] = Field(
        default_factory=list,
        description="priority_support, custom_models, dedicated_instances, sla_guarantee.",
    )
    models: list[str] | None = Field(None, description="Allowed models; None allows all.")
    priority: int = Field(0, description="Admission-queue priority; higher is admitted first.")
    prices: dict[str, float] = Field(
        default_factory=dict, description="Per-feature price overrides (USD per request)."
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

    def model_post_init(self, _ctx: Any) -> None:
        errors = []
        for name, m in self.models.items():
            if m.provider not in self.providers:
                errors.append(f"models.{name}.provider: unknown provider {m.provider!r}")
            if m.dedicated_provider is not None and m.dedicated_provider not in self.providers:
                errors.append(
                    f"models.{name}.dedicated_provider: unknown provider {m.dedicated_provider!r}"
                )
        for name, t in self.tiers.items():
            if t.includes is not None and t.includes not in self.tiers:
                errors.append(f"tiers.{name}.includes: unknown tier {t.includes!r}")
        if errors:
            raise ValueError("; ".join(errors))

    def routes(self, dedicated: bool = False) -> dict[str, Route]:
        """Client model name -> Route, computed once per policy load. ``dedicated``: only the
        models with a ``dedicated_provider``, routed there (plans with that perk)."""
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
            )
        return out

    def allowed_models(self, tier: str) -> frozenset[str] | None:
        """The models a plan may use: its ``models`` list (None: all), less the models marked
        ``custom`` unless the plan has the custom_models perk."""
        t = self.tiers[tier]
        custom = {n for n, m in self.models.items() if m.custom}
        if not custom or "custom_models" in t.perks:
            return frozenset(t.models) if t.models is not None else None
        base = set(t.models) if t.models is not None else set(self.models)
        return frozenset(base - custom)

    def plans_with(self, perk: Perk) -> frozenset[str]:
        """The plans that have ``perk``."""
        return frozenset(name for name, t in self.tiers.items() if perk in t.perks)

    def plan_costs(self) -> dict[str, float]:
        """Each plan's subscription price (USD per month): MRR and invoices."""
        return {name: t.monthly_cost for name, t in self.tiers.items()}

    def priority(self, tier: str) -> int:
        """Admission-queue priority: the plan's, at least 1 with the priority_support perk."""
        t = self.tiers[tier]
        return max(t.priority, 1) if "priority_support" in t.perks else t.priority


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


def _construct(
    node: yaml.Node,
    path: tuple[Any, ...],
    lines: _Lines,
    ctor: yaml.constructor.SafeConstructor,
    base: Path,
    errors: list[str],
) -> Any:
    lines.by_path[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
        if keys and keys[0] in ("$env", "$file") and len(node.value) == 1:
            return _secret(keys[0], node.value[0][1], path, lines, base, errors)
        out: dict[Any, Any] = {}
        for knode, vnode in node.value:
            key = ctor.construct_object(knode)
            out[key] = _construct(vnode, (*path, key), lines, ctor, base, errors)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _construct(v, (*path, i), lines, ctor, base, errors) for i, v in enumerate(node.value)
        ]
    return ctor.construct_object(node)


def _secret(
    kind: str, node: yaml.Node, path: tuple[Any, ...], lines: _Lines, base: Path, errors: list[str]
) -> str | None:
    ref = str(node.value) if isinstance(node, yaml.ScalarNode) else ""
    where = f"{_fmt_path(path, {})} (line {lines.by_path[path]})"
    if kind == "$env":
        value = os.environ.get(ref)
        if value is None:
            errors.append(f"{where}: environment variable {ref} is not set")
        return value
    p = Path(ref).expanduser()
    if not p.is_absolute():
        p = base / p
    try:
        return p.read_text().strip()
    except OSError as e:
        errors.append(f"{where}: cannot read secret file {ref}: {e.strerror}")
        return None


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


def format_validation_error(
    exc: ValidationError, data: Any, lines: _Lines, prefix: tuple[Any, ...] = ()
) -> list[str]:
    """One ``path: message (line N)`` per pydantic error."""
    out = []
    for err in exc.errors():
        loc = prefix + tuple(p for p in err["loc"] if not str(p).startswith("function-"))
        # pydantic adds the union member's name to the location ("int", "literal[...]").
        loc = tuple(
            p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("int", "str")))
        )
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        line = lines.line(loc)
        out.append(f"{_fmt_path(loc, data)}: {msg}" + (f" (line {line})" if line else ""))
    return out


class LoadedPolicy:
    """A validated policy with the raw data and line map (plugins validate their config later)."""

    def __init__(self, policy: Policy, data: dict[str, Any], lines: _Lines, path: Path | None):
        self.policy = policy
        self.data = data
        self.lines = lines
        self.path = path

    def config_errors(self, index: int, exc: ValidationError) -> list[str]:
        """Errors of ``chain[index].config`` with paths and lines."""
        return format_validation_error(exc, self.data, self.lines, ("chain", index, "config"))


def load_text(text: str, *, base: Path | None = None, path: Path | None = None) -> LoadedPolicy:
    """Parse and validate policy YAML text; raise PolicyError with every problem found."""
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
    errors: list[str] = []
    data = _construct(root, (), lines, yaml.constructor.SafeConstructor(), base, errors)
    if not isinstance(data, dict):
        raise PolicyError(["the policy must be a mapping of sections"])
    if errors:
        raise PolicyError(errors)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as e:
        raise PolicyError(format_validation_error(e, data, lines)) from None
    return LoadedPolicy(policy, data, lines, path)


def load_file(path: str | Path) -> LoadedPolicy:
    """Load a policy file; relative ``$file`` secrets resolve against the file's folder."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise PolicyError([f"{p}: {e.strerror}"]) from None
    return load_text(text, base=p.resolve().parent, path=p)
