"""Compile the enabled plugins into per-phase tuples: the hot path never calls pluggy.

pluggy registers and checks plugins (unknown hook names, wrong argument names) once per policy
load. ``compile_chain`` then reads the bound hook methods of each plugin in ``chain:`` order and
stores them per phase, request side top to bottom and response side reversed (Envoy's order), so
the handler runs ``for hook in chain.access: await hook(ctx)``. A phase no plugin implements is
an empty tuple and costs nothing.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import pluggy
from pydantic import BaseModel, ConfigDict, ValidationError

from proxy import hookspecs
from proxy.policy import LoadedPolicy, PolicyError

if TYPE_CHECKING:
    from aiohttp import web

BUILTIN_PLUGINS: dict[str, str] = {
    "auth": "plugins.auth:AuthPlugin",
    "limits": "plugins.limits.plugin:LimitsPlugin",
    "metering": "plugins.metering.plugin:MeteringPlugin",
    "privacy": "plugins.privacy:PrivacyPlugin",
    "routing": "plugins.routing:RoutingPlugin",
    "cache": "plugins.cache.plugin:CachePlugin",
    "batching": "plugins.batching:BatchingPlugin",
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
)
SYNC_HOOKS = ("response_chunk",)


class PluginStartError(Exception):
    """A plugin's lifespan failed before serving (a locked database, an unreachable store)."""


class EmptyConfig(BaseModel):
    """Config of a plugin that takes none: any key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Hook = Callable[..., Any]


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
    response_body: tuple[tuple[int, Hook], ...] = ()
    response_complete: tuple[Hook, ...] = ()
    log: tuple[Hook, ...] = ()
    forget_user: tuple[Hook, ...] = ()
    lifespans: tuple[Hook, ...] = ()
    in_flight: int = 0
    retired: bool = False
    _open: list[AsyncIterator[None]] = field(default_factory=list)

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
    """Build, validate and compile the policy's chain; raise PolicyError naming each plugin.

    ``extra_plugins`` maps names to factories in addition to built-ins and entry points (tests
    register throwaway plugins this way, never on a global manager).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    errors: list[str] = []
    plugins: list[Any] = []
    names: list[str] = []
    for index, item in enumerate(loaded.policy.chain):
        if not item.enabled:
            continue
        where = f"chain[{index}] ({item.name})"
        try:
            factory = (extra_plugins or {}).get(item.name) or resolve_factory(item.name)
        except (LookupError, ImportError) as e:
            errors.append(f"{where}: {e}")
            continue
        config_model: type[BaseModel] = getattr(factory, "Config", EmptyConfig)
        try:
            config = config_model.model_validate(item.config)
        except ValidationError as e:
            errors.extend(loaded.config_errors(index, e))
            continue
        try:
            plugin = factory(config, loaded.policy)
        except (ValueError, TypeError) as e:
            errors.append(f"{where}.config: {e}")
            continue
        try:
            pm.register(plugin, name=item.name)
        except (pluggy.PluginValidationError, ValueError) as e:
            errors.append(f"{where}: {e}")
            continue
        errors.extend(_check_kinds(plugin, where, pm))
        plugins.append(plugin)
        names.append(item.name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        errors.append(f"{_where_of(e.plugin, plugins, names, loaded)}: {e}")
    if errors:
        raise PolicyError(errors)
    return _compile(loaded, pm, tuple(plugins), tuple(names))


def _where_of(plugin: Any, plugins: list[Any], names: list[str], loaded: LoadedPolicy) -> str:
    for p, n in zip(plugins, names, strict=True):
        if p is plugin:
            index = next(i for i, c in enumerate(loaded.policy.chain) if c.name == n)
            return f"chain[{index}] ({n})"
    return "chain"


def _check_kinds(plugin: Any, where: str, pm: pluggy.PluginManager) -> list[str]:
    """A sync implementation of an async hook would return an un-awaited value: refuse it."""
    errors = []
    for impl in pm.get_hookcallers(plugin) or []:
        fn = next(i.function for i in impl.get_hookimpls() if i.plugin is plugin)
        if impl.name in ASYNC_HOOKS and not inspect.iscoroutinefunction(fn):
            errors.append(f"{where}: hook {impl.name} must be 'async def'")
        elif impl.name in SYNC_HOOKS and inspect.iscoroutinefunction(fn):
            errors.append(f"{where}: hook {impl.name} must be a plain 'def' (runs per event)")
        elif impl.name == "lifespan" and not inspect.isasyncgenfunction(fn):
            errors.append(f"{where}: hook lifespan must be an async generator (async def + yield)")
    return errors


def _compile(
    loaded: LoadedPolicy, pm: pluggy.PluginManager, plugins: tuple[Any, ...], names: tuple[str, ...]
) -> Chain:
    position = {id(p): i for i, p in enumerate(plugins)}

    def ordered(hook: str) -> list[tuple[int, Hook]]:
        caller = getattr(pm.hook, hook)
        impls = [(position[id(i.plugin)], i.function) for i in caller.get_hookimpls()]
        return sorted(impls, key=lambda x: x[0])

    def fwd(hook: str) -> tuple[Hook, ...]:
        return tuple(fn for _, fn in ordered(hook))

    def rev(hook: str) -> tuple[tuple[int, Hook], ...]:
        return tuple(reversed(ordered(hook)))

    return Chain(
        loaded=loaded,
        plugins=plugins,
        names=names,
        authenticate=fwd("authenticate"),
        access=tuple(ordered("access")),
        upstream_request=fwd("upstream_request"),
        send_upstream=fwd("send_upstream"),
        response_headers=rev("response_headers"),
        response_chunk=rev("response_chunk"),
        response_body=rev("response_body"),
        response_complete=tuple(fn for _, fn in rev("response_complete")),
        log=fwd("log"),
        forget_user=fwd("forget_user"),
        lifespans=fwd("lifespan"),
    )
