"""The docs are the reference, and they must say what the code does.

The policy keys and the hooks are documented where they are defined (pydantic field
descriptions, hookspec docstrings) and rendered into docs/ by docs/generate.py: a generated
table that differs from a fresh rendering fails here (run `make docs`), and so does a hook, a
policy key or a built-in plugin missing from docs/. The README stays a short first read whose
links all lead somewhere.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from proxy import hookspecs
from proxy.chain import BUILTIN_PLUGINS
from proxy.policy import Policy

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()


def _generator() -> ModuleType:
    """docs/generate.py, imported from its path (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


generate = _generator()


def page(name: str) -> str:
    return (DOCS / name).read_text()


def hook_names() -> list[str]:
    return [n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, "tollway_spec")]


@pytest.mark.parametrize("path", generate.pages(), ids=lambda p: p.name)
def test_generated_tables_are_current(path: Path) -> None:
    text = path.read_text()
    assert generate.regenerate(text) == text, f"{path.name} is stale: run `make docs`"


def test_each_reference_has_its_generated_block() -> None:
    blocks = {
        "policy.md": ["policy"],
        "hooks.md": ["hooks"],
        "plugins.md": [f"plugin:{name}" for name in BUILTIN_PLUGINS],
    }
    for name, wanted in blocks.items():
        found = [m.group("name") for m in generate.BLOCK.finditer(page(name))]
        for block in wanted:
            assert block in found, f"docs/{name} has no <!-- generated:{block} --> block"


def test_every_hook_is_in_the_docs_with_its_signature() -> None:
    hooks_md = page("hooks.md")
    names = hook_names()
    assert {"authenticate", "access", "log", "response_chunk"} <= set(names)
    for name in names:
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"`{name}({params})`" in hooks_md, f"hook {name}({params}) missing from hooks.md"
        assert getattr(hookspecs, name).__doc__, f"hook {name} has no docstring"


def test_every_policy_section_and_key_is_documented() -> None:
    policy_md = page("policy.md")
    for section in Policy.model_fields:
        assert f"`{section}" in policy_md, f"policy section {section} missing from policy.md"
    for key, _, _, _ in generate.policy_keys(Policy):
        assert f"`{key}`" in policy_md, f"policy key {key} missing from policy.md"


def test_every_plugin_and_its_config_is_documented() -> None:
    plugins_md = page("plugins.md")
    for plugin in BUILTIN_PLUGINS:
        assert f"| [`{plugin}`](#{plugin}) |" in plugins_md, f"plugin {plugin} not in the table"
        section = plugins_md.split(f"\n## {plugin}\n", 1)
        assert len(section) == 2, f"plugins.md has no section for {plugin}"
        body = section[1].split("\n## ", 1)[0]
        for key, _, _, _ in generate.policy_keys(generate.plugin_config(plugin)):
            assert f"`{key}`" in body, f"{plugin} config key {key} missing from plugins.md"


def test_the_generator_sees_a_new_key() -> None:
    """The stale check is only as good as the rendering: a field it skipped would never fail."""
    from pydantic import BaseModel, ConfigDict, Field

    class Probe(BaseModel):
        model_config = ConfigDict(extra="forbid")
        window: float = Field(0.1, description="How long to wait.")
        sub: dict[str, list[int]] = Field(default_factory=dict, description="Nested.")

    table = generate.key_table(Probe)
    assert "| `window` | float | `0.1` | How long to wait. |" in table
    assert "| `sub` | map of list[int] | `{}` | Nested. |" in table


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize(
    "path", [ROOT / "README.md", *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name
)
def test_links_lead_somewhere(path: Path) -> None:
    text = path.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{path.name}: link to {target} leads nowhere"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest.read_text()), f"{path.name}: no anchor {target}"


def test_readme_is_a_first_read_that_leads_to_every_reference() -> None:
    assert len(README.splitlines()) <= 250, "README.md is for a first read: move reference to docs/"
    for doc in sorted(DOCS.glob("*.md")):
        assert f"(docs/{doc.name}" in README, f"README.md does not link docs/{doc.name}"
