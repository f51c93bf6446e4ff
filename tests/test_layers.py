"""The layers hold: the core (``proxy/``) imports no plugin, and no plugin imports another.

A plugin reaches the core only through the hooks a third party has, and a built-in plugin may
use the core (``proxy.*``) and its own package, nothing of another plugin. The check reads
every module's source with ``ast`` (nothing is imported), so it sees the imports inside
functions and under ``TYPE_CHECKING`` too, and ``importlib.import_module`` of a literal name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> tuple[str, bool]:
    """``proxy/cli/data.py`` -> ``("proxy.cli.data", False)``; a package's ``__init__`` -> its
    package name and True."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def imported(source: str, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """Every module name the source imports, with its line (relative imports resolved; for
    ``from a import b`` both ``a`` and ``a.b``, since ``b`` may be a module)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield node.lineno, name
            for alias in node.names:
                yield node.lineno, f"{name}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def plugin_of(name: str) -> str | None:
    """The plugin a module belongs to: ``plugins.metering.spool`` -> ``metering``."""
    parts = name.split(".")
    return parts[1] if parts[0] == "plugins" and len(parts) > 1 else None


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """The imports of ``module`` that cross a layer: the core importing ``plugins``, or a
    plugin importing another plugin."""
    owner = plugin_of(module)
    found = []
    for line, name in imported(source, module, is_package):
        target = plugin_of(name)
        if module.split(".")[0] == "proxy" and name.split(".")[0] == "plugins":
            found.append(f"{module}:{line}: the core imports {name}")
        elif owner is not None and target is not None and target != owner:
            found.append(f"{module}:{line}: plugin {owner} imports plugin {target} ({name})")
    return sorted(set(found))


def modules(top: str) -> Iterator[tuple[Path, str, bool]]:
    for path in sorted((ROOT / top).rglob("*.py")):
        yield (path, *module_name(path))


def test_the_core_imports_no_plugin() -> None:
    found = [v for p, m, pkg in modules("proxy") for v in violations(p.read_text(), m, pkg)]
    assert found == []


def test_no_plugin_imports_another_plugin() -> None:
    checked = list(modules("plugins"))
    assert {"plugins.auth", "plugins.metering.plugin", "plugins.limits.plugin"} <= {
        m for _, m, _ in checked
    }
    found = [v for p, m, pkg in checked for v in violations(p.read_text(), m, pkg)]
    assert found == []


def test_the_check_catches_planted_violations() -> None:
    # the core, at the top, inside a function, under TYPE_CHECKING, by a literal import_module
    assert violations("import plugins.auth\n", "proxy.app") == [
        "proxy.app:1: the core imports plugins.auth"
    ]
    assert violations(
        "def f():\n    from plugins.metering.database import UsageDB\n", "proxy.cli.data"
    ) == [
        "proxy.cli.data:2: the core imports plugins.metering.database",
        "proxy.cli.data:2: the core imports plugins.metering.database.UsageDB",
    ]
    assert violations(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from plugins import cache\n",
        "proxy.dashboard",
    )
    assert violations(
        "import importlib\nimportlib.import_module('plugins.routing')\n", "proxy.chain"
    ) == ["proxy.chain:2: the core imports plugins.routing"]
    # a plugin reaching into another: absolute, relative, through the parent package
    assert violations("from plugins.routing import RoutingPlugin\n", "plugins.limits.plugin")
    assert violations("from ..routing import RoutingPlugin\n", "plugins.limits.plugin") == [
        "plugins.limits.plugin:1: plugin limits imports plugin routing (plugins.routing)",
        "plugins.limits.plugin:1: plugin limits imports plugin routing "
        "(plugins.routing.RoutingPlugin)",
    ]
    assert violations("from plugins import auth\n", "plugins.cache.store") == [
        "plugins.cache.store:1: plugin cache imports plugin auth (plugins.auth)"
    ]
    assert violations("from .. import metering\n", "plugins.cache", is_package=True) == [
        "plugins.cache:1: plugin cache imports plugin metering (plugins.metering)"
    ]
    # what is allowed: the core, the plugin's own package (absolute or relative), libraries
    allowed = (
        "import duckdb\nfrom proxy.figures import Figures\nfrom proxy import hookspecs\n"
        "from plugins.metering.spool import Spool\nfrom . import database\n"
        "from .stream import Meter\nimport plugins\n"
    )
    assert violations(allowed, "plugins.metering.cli") == []
    assert violations("from . import plugin\n", "plugins.metering", is_package=True) == []
