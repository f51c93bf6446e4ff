"""The README is the reference: every hook (with its arguments) and every policy section and
built-in plugin must be documented there (a new hook without docs fails the suite)."""

from __future__ import annotations

import inspect
from pathlib import Path

from proxy import hookspecs
from proxy.chain import BUILTIN_PLUGINS
from proxy.policy import Policy

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def hook_names() -> list[str]:
    return [n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, "tollway_spec")]


def test_every_hook_is_in_the_readme_with_its_signature() -> None:
    names = hook_names()
    assert {"authenticate", "access", "log", "response_chunk"} <= set(names)
    for name in names:
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"`{name}({params})`" in README, f"hook {name}({params}) missing from README"
        assert getattr(hookspecs, name).__doc__, f"hook {name} has no docstring"


def test_every_policy_section_and_plugin_is_documented() -> None:
    for section in Policy.model_fields:
        assert f"`{section}" in README, f"policy section {section} missing from README"
    for plugin in BUILTIN_PLUGINS:
        assert f"| `{plugin}` |" in README, f"plugin {plugin} missing from README"
