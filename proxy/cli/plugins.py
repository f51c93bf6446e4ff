"""Plugin commands: every installed plugin's ``register_commands`` hook, without a policy.

The command line exists before any policy is read (``tollway meter --policy ...`` reads its
own), so the CLI cannot ask the chain: it registers the class of every built-in plugin and of
every entry point of group ``tollway`` with pluggy, which checks the hook's arguments as it
does for the chain, and calls the hook on the class (hence a ``@staticmethod``). A plugin that
cannot be imported costs only its own commands, with a warning, never the others'.
"""

from __future__ import annotations

import argparse
import inspect
import logging
from importlib.metadata import entry_points

import pluggy

from proxy import hookspecs
from proxy.chain import BUILTIN_PLUGINS, resolve_factory

log = logging.getLogger("tollway")


def plugin_names() -> list[str]:
    """Built-ins first, in their order, then the entry points (a name taken is the built-in's)."""
    names = list(BUILTIN_PLUGINS)
    for ep in entry_points(group=hookspecs.PROJECT):
        if ep.name not in names:
            names.append(ep.name)
    return names


def add_plugin_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Let each installed plugin add its subcommands (and options of the data commands)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in plugin_names():
        try:
            factory = resolve_factory(name)
            pm.register(factory, name=name)
        except Exception as e:  # a broken plugin must not take the whole command line down
            log.warning("plugin %s: its commands are unavailable (%s)", name, e)
    for impl in pm.hook.register_commands.get_hookimpls():  # registration order
        # called on the class: a plain method would be missing its instance
        if not isinstance(inspect.getattr_static(impl.plugin, "register_commands"), staticmethod):
            log.warning("plugin %s: register_commands must be a @staticmethod", impl.plugin_name)
            continue
        impl.function(subparsers)
