"""Compile the enabled plugins into per-phase tuples: the hot path never calls pluggy.

pluggy registers and checks plugins (unknown hook names, wrong argument names) once per policy
load. ``compile_chain`` then reads the bound hook methods of each plugin in ``chain:`` order and
stores them per phase, request side top to bottom and response side reversed (Envoy's order), so
the handler runs ``for hook in chain.access: await hook(ctx)``. A phase no plugin implements is
an empty tuple and costs nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import pluggy
from pydantic import BaseModel, ConfigDict, ValidationError

from proxy import hookspecs
from proxy.context import ENDPOINTS
from proxy.policy import LoadedPolicy, PolicyError, validation_context

if TYPE_CHECKING:
    from aiohttp import web

BUILTIN_PLUGINS: dict[str, str] = {
    "auth": "plugins.auth:AuthPlugin",
    "limits": "plugins.limits.plugin:LimitsPlugin",
    "budgets": "plugins.budgets.plugin:BudgetsPlugin",
    "metering": "plugins.metering.plugin:MeteringPlugin",
    "privacy": "plugins.privacy:PrivacyPlugin",
    "routing": "plugins.routing:RoutingPlugin",
    "responses": "plugins.responses.plugin:ResponsesPlugin",
    "cache": "plugins.cache.plugin:CachePlugin",
    "batching": "plugins.batching.plugin:BatchingPlugin",
    "webhooks": "plugins.webhooks.plugin:WebhooksPlugin",
    "otel": "plugins.otel.plugin:OtelPlugin",
    "accesslog": "plugins.accesslog:AccessLogPlugin",
}
"""Built-in plugin name -> ``module:factory``; third parties use entry-point group 'tollway'."""

ASYNC_HOOKS = (
    "authenticate",
    "access",
    "upstream_request",
    "send_upstream",
    "response_headers",
    "response_body",
    "response_complete",
    "log",
    "forget_user",
    "dashboard_figures",
    "account_report",
)
SYNC_HOOKS = ("response_chunk",)
COLD_HOOKS = ("register_routes", "model_names", "cached_features", "data_files")
"""Plain ``def`` hooks called off the request path: what a plugin adds to the application
(once per compile) or tells about itself (``tollway demo``'s banner)."""
STATIC_HOOKS = ("register_commands",)
"""Hooks called on the plugin's class, before any policy exists: ``@staticmethod``."""


class PluginStartError(Exception):
    """A plugin's lifespan failed before serving (a locked database, an unreachable store)."""


class EmptyConfig(BaseModel):
    """Config of a plugin that takes none: any key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Hook = Callable[..., Any]


@dataclass(slots=True, frozen=True)
class PluginRoute:
    """An HTTP route a plugin added with ``register_routes``, and the plugin that owns it."""

    plugin: str
    method: str
    path: str
    handler: Hook
    kwargs: dict[str, Any]


@dataclass(slots=True, eq=False)
class Chain:
    """The compiled chain of one policy load; swapped atomically on reload.

    Response-side tuples hold ``(position, hook)`` so a Reply from ``access`` at position k can
    skip the plugins from k down. ``in_flight`` counts requests still running on this chain, so
    a retired chain closes its plugins only after its last request finished.
    """

    loaded: LoadedPolicy
    plugins: tuple[Any, ...]
    names: tuple[str, ...]
    authenticate: tuple[Hook, ...] = ()
    access: tuple[tuple[int, Hook], ...] = ()
    upstream_request: tuple[Hook, ...] = ()
    send_upstream: tuple[Hook, ...] = ()
    response_headers: tuple[tuple[int, Hook], ...] = ()
    response_chunk: tuple[tuple[int, Hook], ...] = ()
    chunks_always: bool = False
    """Some ``response_chunk`` hook here is not ``@on_demand``: every stream's events are
    parsed for it; otherwise only those of a request with ``ctx.parse_events``."""
    response_body: tuple[tuple[int, Hook], ...] = ()
    response_complete: tuple[Hook, ...] = ()
    log: tuple[Hook, ...] = ()
    forget_user: tuple[Hook, ...] = ()
    lifespans: tuple[Hook, ...] = ()
    dashboard_figures: tuple[Hook, ...] = ()
    account_report: tuple[Hook, ...] = ()
    routes: dict[tuple[str, str], PluginRoute] = field(default_factory=dict)
    """The plugins' routes by ``(METHOD, path)``, read when a request to one arrives."""
    model_names: tuple[str, ...] = ()
    """Model names the plugins answer for themselves, listed by ``GET /v1/models``."""
    cached_features: tuple[Hook, ...] = ()
    data_files: tuple[Hook, ...] = ()
    views: dict[str, Chain] = field(default_factory=dict)
    """Per endpoint, when a hook is limited to some (``hookspecs.endpoints``): this chain with
    its per-request tuples holding only that endpoint's hooks. Views are never started,
    stopped or counted in flight: that is the chain's own business."""
    in_flight: int = 0
    retired: bool = False
    _open: list[AsyncIterator[None]] = field(default_factory=list)

    def for_endpoint(self, endpoint: str) -> Chain:
        """The hooks to run for a request to ``endpoint`` (one dict lookup per request)."""
        return self.views.get(endpoint, self)

    async def start(self, app: web.Application) -> None:
        """Enter each plugin's lifespan in chain order; a failure names the plugin (and the
        plugins already started are closed again)."""
        for fn in self.lifespans:
            agen = fn(app=app)
            try:
                await agen.__anext__()
            except Exception as e:
                await self.stop()
                raise PluginStartError(f"plugin {self.name_of(fn)} could not start: {e}") from e
            self._open.append(agen)

    def name_of(self, hook: Hook) -> str:
        """The chain name of the plugin a hook belongs to (for logs naming a failing plugin)."""
        owner = getattr(hook, "__self__", None)
        return next((n for p, n in zip(self.plugins, self.names, strict=True) if p is owner), "?")

    async def stop(self) -> None:
        """Exit the lifespans in reverse order; every one runs even if another fails."""
        while self._open:
            agen = self._open.pop()
            try:
                await agen.__anext__()
            except StopAsyncIteration:
                pass


def resolve_factory(name: str) -> Callable[..., Any]:
    """Find a plugin factory: built-ins first, then the 'tollway' entry points."""
    target = BUILTIN_PLUGINS.get(name)
    if target is not None:
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]
    for ep in entry_points(group=hookspecs.PROJECT):
        if ep.name == name:
            return ep.load()  # type: ignore[no-any-return]
    known = sorted(set(BUILTIN_PLUGINS) | {ep.name for ep in entry_points(group=hookspecs.PROJECT)})
    raise LookupError(f"unknown plugin {name!r} (known: {', '.join(known)})")


def compile_chain(
    loaded: LoadedPolicy,
    *,
    extra_plugins: dict[str, Callable[..., Any]] | None = None,
) -> Chain:
    """Validate, build and compile the policy's chain; raise PolicyError with every problem
    of the policy (``loaded.errors`` first), each with its path and line.

    Every enabled item's plugin and config is validated even when other items or the top
    level have errors, so one run reports them all; plugins are built only from a valid
    policy. A plugin whose config holds an unresolved secret (a policy read with optional
    secrets, ``tollway check``) is validated, not built: it would see a stand-in value.
    ``extra_plugins`` maps names to factories in addition to built-ins and entry points (tests
    register throwaway plugins this way, never on a global manager).
    """
    errors = list(loaded.errors)
    valid = _validate(loaded, extra_plugins, errors)
    if errors:
        raise PolicyError(errors)
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    plugins: list[Any] = []
    names: list[str] = []
    indices: list[int] = []
    for index, name, factory, config in valid:
        where = ("chain", index)
        if loaded.has_unset((*where, "config")):
            continue
        try:
            plugin = factory(config, loaded.policy)
        except (ValueError, TypeError) as e:
            errors.append(loaded.error((*where, "config"), str(e)))
            continue
        try:
            pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as e:
            errors.append(loaded.error(where, str(e)))
            continue
        errors.extend(loaded.error(where, message) for message in _check_kinds(plugin, pm))
        plugins.append(plugin)
        names.append(name)
        indices.append(index)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        owner = next((i for p, i in zip(plugins, indices, strict=True) if p is e.plugin), None)
        errors.append(loaded.error(("chain",) if owner is None else ("chain", owner), str(e)))
    routes, models = _contributions(pm, plugins, names, indices, loaded, errors)
    if errors:
        raise PolicyError(errors)
    chain = _compile(loaded, pm, tuple(plugins), tuple(names))
    chain.routes, chain.model_names = routes, models
    return chain


def _contributions(
    pm: pluggy.PluginManager,
    plugins: list[Any],
    names: list[str],
    indices: list[int],
    loaded: LoadedPolicy,
    errors: list[str],
) -> tuple[dict[tuple[str, str], PluginRoute], tuple[str, ...]]:
    """Call ``register_routes`` and ``model_names`` once, in chain order, and check what they
    return; a bad answer (or a hook that raises) is an error naming the plugin, like its config."""
    from aiohttp import web  # the CLI imports this module; aiohttp only where a chain compiles

    routes: dict[tuple[str, str], PluginRoute] = {}
    models: list[str] = []
    listed = set(loaded.policy.models)
    for plugin, name, index in zip(plugins, names, indices, strict=True):
        where = ("chain", index)
        for impl in pm.hook.register_routes.get_hookimpls():
            if impl.plugin is not plugin or not _plain(impl.function):
                continue
            try:
                result: Any = impl.function()
                defs = list(result or ())
            except Exception as e:
                errors.append(loaded.error(where, f"hook register_routes failed: {e}"))
                continue
            for d in defs:
                if not isinstance(d, web.RouteDef):
                    errors.append(
                        loaded.error(
                            where,
                            "register_routes must return aiohttp route definitions "
                            f"(web.get(...)), not {type(d).__name__}",
                        )
                    )
                    continue
                key = (d.method.upper(), d.path)
                if key in routes:
                    errors.append(
                        loaded.error(
                            where,
                            f"route {key[0]} {key[1]} is already plugin {routes[key].plugin}'s",
                        )
                    )
                    continue
                routes[key] = PluginRoute(name, key[0], d.path, d.handler, dict(d.kwargs))
        for impl in pm.hook.model_names.get_hookimpls():
            if impl.plugin is not plugin or not _plain(impl.function):
                continue
            try:
                answer: Any = impl.function()
                found = list(answer or ())
            except Exception as e:
                errors.append(loaded.error(where, f"hook model_names failed: {e}"))
                continue
            for model in found:
                if not isinstance(model, str) or not model:
                    errors.append(
                        loaded.error(where, f"model_names must return names, not {model!r}")
                    )
                elif model not in listed:
                    listed.add(model)
                    models.append(model)
    return routes, tuple(models)


def _plain(fn: Hook) -> bool:
    """Not async: an async implementation of a plain hook is refused (``_check_kinds``) and
    never called, or its coroutine would be left un-awaited."""
    return not (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn))


def check_chain(
    loaded: LoadedPolicy, *, extra_plugins: dict[str, Callable[..., Any]] | None = None
) -> list[str]:
    """Every error of a policy read with ``read_file``: its own and each enabled item's
    plugin and config, without building a plugin (for reporting a policy with errors)."""
    errors = list(loaded.errors)
    _validate(loaded, extra_plugins, errors)
    return errors


def _validate(
    loaded: LoadedPolicy,
    extra_plugins: dict[str, Callable[..., Any]] | None,
    errors: list[str],
) -> list[tuple[int, str, Callable[..., Any], BaseModel]]:
    """(index, name, factory, config) of each enabled item that resolves and validates; the
    others' errors go to ``errors``. Configs are validated with the policy as pydantic's
    validation context (``proxy.policy.policy_of``), so a config's references to other
    sections are checked by its model and reported at their path and line."""
    context = validation_context(loaded.policy)
    valid = []
    for index, item in loaded.chain_items():
        if not item.enabled:
            continue
        try:
            factory = (extra_plugins or {}).get(item.name) or resolve_factory(item.name)
        except (LookupError, ImportError) as e:
            errors.append(loaded.error(("chain", index), str(e)))
            continue
        config_model: type[BaseModel] = getattr(factory, "Config", EmptyConfig)
        try:
            config = config_model.model_validate(item.config, context=context)
        except ValidationError as e:
            errors.extend(loaded.config_errors(index, e))
            continue
        valid.append((index, item.name, factory, config))
    return valid


def _check_kinds(plugin: Any, pm: pluggy.PluginManager) -> list[str]:
    """A sync implementation of an async hook would return an un-awaited value: refuse it."""
    errors = []
    for impl in pm.get_hookcallers(plugin) or []:
        fn = next(i.function for i in impl.get_hookimpls() if i.plugin is plugin)
        if hasattr(fn, "tollway_endpoints") and impl.name not in hookspecs.REQUEST_HOOKS:
            errors.append(f"hook {impl.name} runs once, not per request: it has no endpoints")
        if hasattr(fn, "tollway_on_demand") and impl.name != "response_chunk":
            errors.append(f"hook {impl.name} cannot be @on_demand: only response_chunk can")
        if impl.name in ASYNC_HOOKS and not inspect.iscoroutinefunction(fn):
            errors.append(f"hook {impl.name} must be 'async def'")
        elif impl.name in SYNC_HOOKS and inspect.iscoroutinefunction(fn):
            errors.append(f"hook {impl.name} must be a plain 'def' (runs per event)")
        elif impl.name == "lifespan" and not inspect.isasyncgenfunction(fn):
            errors.append("hook lifespan must be an async generator (async def + yield)")
        elif impl.name in COLD_HOOKS and (
            inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)
        ):
            errors.append(f"hook {impl.name} must be a plain 'def' (called once a load)")
        elif impl.name in STATIC_HOOKS and inspect.ismethod(fn):
            errors.append(
                f"hook {impl.name} must be a @staticmethod (the CLI calls it on the class, "
                "before any policy is loaded)"
            )
    return errors


def _by_position(fn: Hook, spec: tuple[str, ...], takes: tuple[str, ...]) -> Hook:
    """``fn``, callable with its spec's arguments by position though it takes fewer of them.

    pluggy accepts an implementation that declares a subset of its spec's arguments, in any
    order (it calls by name); the chain calls by position, which costs less per request. An
    implementation taking exactly the spec's arguments is used as it is; another gets this
    adapter, built once per load, so a hook that gains an argument (``send_upstream``'s
    ``call``) keeps serving the plugins written before it instead of failing per request.
    """
    if takes == spec:
        return fn
    pick = tuple(spec.index(name) for name in takes)

    @functools.wraps(fn)
    def adapted(*args: Any) -> Any:
        return fn(*[args[i] for i in pick])

    adapted.__self__ = getattr(fn, "__self__", None)  # type: ignore[attr-defined]  # name_of
    return adapted


def _compile(
    loaded: LoadedPolicy, pm: pluggy.PluginManager, plugins: tuple[Any, ...], names: tuple[str, ...]
) -> Chain:
    position = {id(p): i for i, p in enumerate(plugins)}

    def ordered(hook: str) -> list[tuple[int, Hook]]:
        caller = getattr(pm.hook, hook)
        spec = tuple(caller.spec.argnames)
        impls = [
            (
                position[id(i.plugin)],
                # lifespan is called by keyword (Chain.start): any subset already fits
                i.function if hook == "lifespan" else _by_position(i.function, spec, i.argnames),
            )
            for i in caller.get_hookimpls()
        ]
        return sorted(impls, key=lambda x: x[0])

    def fwd(hook: str) -> tuple[Hook, ...]:
        return tuple(fn for _, fn in ordered(hook))

    def rev(hook: str) -> tuple[tuple[int, Hook], ...]:
        return tuple(reversed(ordered(hook)))

    request = {h: ordered(h) for h in hookspecs.REQUEST_HOOKS}

    def phases(endpoint: str | None) -> dict[str, Any]:
        """The per-request tuples; for ``endpoint``, without the hooks limited to others."""
        kept = {
            h: [
                (i, fn)
                for i, fn in impls
                if endpoint is None or endpoint in getattr(fn, "tollway_endpoints", (endpoint,))
            ]
            for h, impls in request.items()
        }
        first = ("upstream_request", "send_upstream", "log")
        out: dict[str, Any] = {h: tuple(fn for _, fn in kept[h]) for h in first}
        out["access"] = tuple(kept["access"])
        for h in ("response_headers", "response_chunk", "response_body"):
            out[h] = tuple(reversed(kept[h]))
        out["response_complete"] = tuple(fn for _, fn in reversed(kept["response_complete"]))
        out["chunks_always"] = any(
            not getattr(fn, "tollway_on_demand", False) for _, fn in kept["response_chunk"]
        )
        return out

    chain = Chain(
        loaded=loaded,
        plugins=plugins,
        names=names,
        authenticate=fwd("authenticate"),
        **phases(None),
        forget_user=fwd("forget_user"),
        lifespans=fwd("lifespan"),
        dashboard_figures=fwd("dashboard_figures"),
        account_report=fwd("account_report"),
        cached_features=fwd("cached_features"),
        data_files=fwd("data_files"),
    )
    limited = any(hasattr(fn, "tollway_endpoints") for impls in request.values() for _, fn in impls)
    if limited:  # only then does a request pick a view: otherwise the chain is every view
        chain.views = {e: dataclasses.replace(chain, **phases(e), views={}) for e in ENDPOINTS}
    return chain
