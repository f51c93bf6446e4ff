"""Checks of what a client sends that the rest of the gateway could not survive.

Two kinds of input pass HTTP parsing and JSON parsing and still break later steps:

- Header bytes that are not UTF-8. aiohttp decodes header values as UTF-8 with
  ``surrogateescape``, so such bytes arrive as lone surrogates, which ``str.encode()`` (hence
  every hash of them), orjson and DuckDB refuse: a key lookup, the usage row or a cache key
  would fail with a 500 long after the request was accepted.
- JSON nested deeper than orjson serialises. orjson parses up to 1024 levels but writes only
  about 254, and every body is written again (the upstream request, the cache fingerprint, a
  translation that wraps a level or two), so a body between the two limits was a 500.

Both are checked once, at the start of a request, at the cost of a few string checks and at
most one extra serialisation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

MAX_JSON_DEPTH = 128
"""The deepest nesting of objects and arrays a request body may have (the body object itself
is level 1). Far beyond what a real request needs (deep JSON Schemas are a few tens of levels),
far enough below orjson's write limit that wrapping and translating a body stays safe, and
well inside Python's recursion limit for the walkers that recurse per level (privacy's)."""


def undecodable_header(headers: Mapping[str, str]) -> str | None:
    """The name of the first header whose value is not valid UTF-8, or None.

    Valid non-ASCII UTF-8 (``café``) is accepted as before; only bytes that decode to lone
    surrogates are refused. The common all-ASCII request costs one join and one ``isascii``,
    both in C (about half the cost of an ``isascii`` per header in a Python loop); only a
    request with a non-ASCII value walks its headers.
    """
    if "".join(headers.values()).isascii():
        return None
    for name, value in headers.items():
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                return name
    return None


def _dump_limit() -> int:
    """The deepest nesting ``orjson.dumps`` accepts (254 in orjson 3.x), measured once."""
    nested: list[Any] = []
    depth = 1
    while depth < 100_000:
        try:
            orjson.dumps(nested)
        except TypeError:
            return depth - 1
        nested = [nested]
        depth += 1
    return depth


class _Slot:
    """Stands where the body goes in the padding; orjson asks ``default`` what to write there."""

    __slots__ = ()


def _padding(levels: int) -> list[Any]:
    """``levels`` nested one-element lists with a ``_Slot`` at the bottom."""
    outer: list[Any] = [_Slot()]
    for _ in range(levels - 1):
        outer = [outer]
    return outer


# The body is written under (orjson's limit - MAX_JSON_DEPTH) levels of padding, so orjson
# refuses it exactly when it nests deeper than MAX_JSON_DEPTH. One serialisation in C costs a
# few microseconds (about a seventh of the parse); a walk over the parsed body in Python would
# cost about as much as the parse. The body reaches the slot through ``default``, a closure per
# call, so concurrent checks (gateways on several threads) never share state.
_PADDING = _padding(_dump_limit() - MAX_JSON_DEPTH)


def too_deep(body: Any) -> bool:
    """Whether ``body`` (a value orjson parsed) nests deeper than ``MAX_JSON_DEPTH``."""
    try:
        orjson.dumps(_PADDING, default=lambda _slot: body)
    except TypeError:  # what orjson parsed it can write, unless it is too deep
        return True
    return False
