"""A JSON value that fits a JSON schema: the emulator's answer to structured-output requests.

A client asking for ``json_schema`` output (chat's ``response_format``, the Responses API's
``text.format``) parses the reply into its own type, as the openai SDK's ``parse`` helpers
do; a reply that is not valid against the schema fails there. So the emulator answers with
the smallest deterministic value the schema accepts: strings carry the echoed prompt (so tests
can still see what was asked), numbers are their minimum or 0, arrays hold one item. The
subset covered is what strict structured outputs allow (objects, arrays, scalars, ``enum``,
``const``, ``anyOf``, ``$ref`` to ``$defs``), which is what pydantic models produce.
"""

from __future__ import annotations

from typing import Any

_MAX_DEPTH = 32  # a recursive schema ($ref to itself) stops here with null


def schema_instance(schema: Any, text: str) -> Any:
    """A value valid against ``schema``; ``text`` fills the strings."""
    root = schema if isinstance(schema, dict) else {}
    return _value(root, root, text, 0)


def _resolve(root: dict[str, Any], ref: str) -> dict[str, Any]:
    """A local ``$ref`` (``#/$defs/Name`` or ``#/definitions/Name``); anything else is {}."""
    node: Any = root
    if not ref.startswith("#"):
        return {}
    for part in ref[1:].split("/"):
        if not part:
            continue
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def _value(schema: dict[str, Any], root: dict[str, Any], text: str, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return _value(_resolve(root, ref), root, text, depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            # prefer an option that is not null, so the answer carries content
            pick = next(
                (o for o in options if isinstance(o, dict) and o.get("type") != "null"),
                options[0],
            )
            return _value(pick if isinstance(pick, dict) else {}, root, text, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties")
        out: dict[str, Any] = {}
        for name, sub in (props if isinstance(props, dict) else {}).items():
            out[name] = _value(sub if isinstance(sub, dict) else {}, root, text, depth + 1)
        return out
    if kind == "array":
        items = schema.get("items")
        count = max(1, int(schema.get("minItems") or 1))
        item = _value(items if isinstance(items, dict) else {}, root, text, depth + 1)
        return [item] * count
    if kind == "integer":
        return int(schema.get("minimum") or 0)
    if kind == "number":
        return float(schema.get("minimum") or 0)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return text  # a string, or a schema that says nothing: any value fits
