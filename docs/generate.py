"""Render the reference tables of docs/ from the code they describe.

A policy key is defined once, as a pydantic field with its default and its description
(``proxy/policy.py``'s ``Policy`` and each built-in plugin's ``Config``), and a hook once, as a
spec with its docstring (``proxy/hookspecs.py``). Tables written by hand beside them drift: a
key is added and not documented, a default changes and the docs keep the old one. So the
tables between ``<!-- generated:NAME -->`` and ``<!-- /generated -->`` are rendered here, the
prose around them is written by hand, and ``tests/test_docs.py`` renders them again in memory
and fails when a page differs from its code.

    .venv/bin/python docs/generate.py           # rewrite the generated blocks (make docs)
    .venv/bin/python docs/generate.py --check   # exit 1 naming the stale pages
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
import types
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
if str(ROOT) not in sys.path:  # run as a script: the project's packages are importable
    sys.path.insert(0, str(ROOT))

from pydantic import BaseModel, SecretStr  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402

from proxy import hookspecs  # noqa: E402
from proxy.chain import BUILTIN_PLUGINS, EmptyConfig  # noqa: E402
from proxy.policy import Policy, parse_duration  # noqa: E402
from proxy.translate import fields  # noqa: E402

BLOCK = re.compile(
    r"(<!-- generated:(?P<name>[\w:.-]+) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.S
)
"""A generated block; the text between the markers is replaced, the markers stay."""


# ---- policy keys ---------------------------------------------------------------------------


def _model_of(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """(how the key path continues, the model) when a field holds a model: ``x.field``,
    ``x.NAME.field`` for a mapping of models, ``x[i].field`` for a list of them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if issubclass(annotation, SecretStr):
            return None
        return ".", annotation
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _model_of(inner[0]) if len(inner) == 1 else None
    if origin is dict and len(args) == 2:
        found = _model_of(args[1])
        return (".NAME.", found[1]) if found else None
    if origin is list and args:
        found = _model_of(args[0])
        return ("[i].", found[1]) if found else None
    return None


def _type(annotation: Any) -> str:
    """A short, readable type: ``int``, ``list[str]``, ``serve | refuse``, ``secret``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type(a) for a in args if a is not type(None))
    if origin is list:
        return f"list[{_type(args[0])}]" if args else "list"
    if origin is dict:
        return f"map of {_type(args[1])}" if args else "map"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, SecretStr):
        return "secret"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _names(code: types.CodeType) -> set[str]:
    """The global names a function's code (and the comprehensions in it) refers to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def durations(model: type[BaseModel]) -> frozenset[str]:
    """The fields parsed with ``parse_duration`` (written ``100ms``, ``7d``...): typed
    ``Seconds`` (its ``BeforeValidator`` is in the field's metadata) or by a validator."""
    out: set[str] = set()
    for name, field in model.model_fields.items():
        if any(getattr(m, "func", None) is parse_duration for m in field.metadata):
            out.add(name)
    for dec in model.__pydantic_decorators__.field_validators.values():
        code = getattr(dec.func, "__code__", None)
        if code is not None and "parse_duration" in _names(code):
            out.update(dec.info.fields)
    return frozenset(out)


def _seconds(v: float) -> str:
    """A duration default the way a policy would write it."""
    if 0 < v < 1:
        return f"{v * 1000:g}ms"
    for unit, size in (("d", 86400), ("h", 3600)):
        if v >= size and v % size == 0:
            return f"{v / size:g}{unit}"
    return f"{v:g}s"


def _value(v: Any, duration: bool = False) -> str:
    """A default as it would be written in policies.yaml."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Enum):
        return str(v.value)
    if duration and isinstance(v, int | float):
        return _seconds(v)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, int) and v >= 1 << 20 and v % (1 << 20) == 0:
        return f"{v} ({v >> 20} MiB)"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def _default(field: FieldInfo, duration: bool) -> str:
    """The default as a code span; ``required`` and a section's ``-`` as plain text."""
    if field.is_required() or (field.default is PydanticUndefined and not field.default_factory):
        return "required"
    value = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
    if isinstance(value, BaseModel):
        return "-"
    return f"`{_cell(_value(value, duration))}`"


def policy_keys(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(key path, type, default, description) of every field, nested sections walked; the
    default is ready for a table cell."""
    timed = durations(model)
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        nested = _model_of(field.annotation)
        if nested is None:
            typ = _type(field.annotation)
            if name in timed:
                typ = re.sub(r"\b(float|int)\b", "duration", typ)
            yield key, typ, _default(field, name in timed), field.description or ""
            continue
        if field.description:
            kind = {".": "section", ".NAME.": "map", "[i].": "list"}[nested[0]]
            yield key, kind, _default(field, False), field.description
        yield from policy_keys(nested[1], key + nested[0])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def key_table(model: type[BaseModel], prefix: str = "") -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, typ, default, description in policy_keys(model, prefix):
        rows.append(f"| `{key}` | {_cell(typ)} | {default} | {_cell(description)} |")
    return "\n".join(rows) + "\n"


def plugin_config(name: str) -> type[BaseModel]:
    """The config model of a built-in plugin (``EmptyConfig`` when it takes none)."""
    module, _, attr = BUILTIN_PLUGINS[name].partition(":")
    factory = getattr(importlib.import_module(module), attr)
    config: type[BaseModel] = getattr(factory, "Config", EmptyConfig)
    return config


def plugin_table(name: str) -> str:
    config = plugin_config(name)
    if not config.model_fields:
        return "No configuration.\n"
    return key_table(config)


# ---- hooks ---------------------------------------------------------------------------------


def hooks() -> list[Callable[..., Any]]:
    """Every hook spec, in the order hookspecs.py declares them."""
    return [f for f in vars(hookspecs).values() if callable(f) and hasattr(f, "tollway_spec")]


def hook_signature(fn: Callable[..., Any]) -> str:
    return f"{fn.__name__}({', '.join(inspect.signature(fn).parameters)})"


def hook_kind(fn: Callable[..., Any]) -> str:
    first = " first non-None" if fn.tollway_spec.get("firstresult") else ""  # type: ignore[attr-defined]
    if inspect.iscoroutinefunction(fn):
        return "async" + ("," + first if first else "")
    if "AsyncIterator" in str(fn.__annotations__.get("return", "")):
        return "async generator"
    return "sync" + ("," + first if first else "")


def _markdown(doc: str) -> str:
    """A docstring's reST literals (````x````) as Markdown code."""
    return doc.replace("``", "`")


def hook_table() -> str:
    rows = ["| hook | kind | meaning |", "|---|---|---|"]
    details = []
    for fn in hooks():
        doc = _markdown(inspect.getdoc(fn) or "")
        first, _, rest = doc.partition("\n\n")
        rows.append(f"| `{hook_signature(fn)}` | {hook_kind(fn)} | {_cell(first)} |")
        details.append(f"### `{hook_signature(fn)}`\n\n{hook_kind(fn)}. {first}\n")
        if rest.strip():
            details.append(rest.strip() + "\n")
    return "\n".join(rows) + "\n\n" + "\n".join(details)


# ---- dialect translation -------------------------------------------------------------------

_CLIENTS: dict[str, fields.Direction] = {
    "openai": "openai->anthropic",
    "anthropic": "anthropic->openai",
}


def _json(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "))


def _example(f: fields.Field) -> str:
    """What the row's example becomes: the provider's fields, a 400, or nothing."""
    given = f"`{_cell(_json(f.example))}`"
    if f.decision == "refused":
        return f"{given} → 400"
    if f.decision == "emulated":
        return f"{given} → done by the gateway, not sent"
    if not f.sent:
        return f"{given} → nothing sent"
    sent = ", ".join(f"{k}: {_json(v)}" for k, v in f.sent.items())
    return f"{given} → `{_cell(sent)}`"


def translation_table(client: str) -> str:
    """The fields of one client dialect's requests to a provider of the other, one row each:
    ``proxy/translate/fields.py``'s decisions."""
    rows = ["| field | decision | what happens | example |", "|---|---|---|---|"]
    for f in sorted(fields.TABLES[_CLIENTS[client]].values(), key=lambda f: f.name):
        how = _markdown(f.how)
        decision = "ignored (no effect on the answer)" if f.decision == "ignored" else f.decision
        rows.append(f"| `{f.name}` | {decision} | {_cell(how)} | {_example(f)} |")
    return "\n".join(rows) + "\n"


# ---- pages ---------------------------------------------------------------------------------


def render(name: str) -> str:
    """The text of generated block ``name``."""
    if name == "policy":
        return key_table(Policy)
    if name == "hooks":
        return hook_table()
    if name.startswith("plugin:"):
        return plugin_table(name.removeprefix("plugin:"))
    if name.startswith("translation:"):
        return translation_table(name.removeprefix("translation:"))
    raise KeyError(f"unknown generated block {name!r}")


def regenerate(text: str) -> str:
    """``text`` with every generated block rendered afresh."""
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("name")) + m.group(4), text)


def pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--check", action="store_true", help="exit 1 if a page is stale")
    args = p.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text()
        fresh = regenerate(text)
        if fresh == text:
            continue
        stale.append(page.relative_to(ROOT))
        if not args.check:
            page.write_text(fresh)
    for path in stale:
        print(f"{path}: {'stale' if args.check else 'regenerated'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
