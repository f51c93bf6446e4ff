"""A stored conversation, rebuilt from records, for a request that continues it.

A record's ``items`` are the input that went to the provider for that response, and ``prev``
the ``previous_response_id`` the provider itself was given (a native continuation: the provider
holds the earlier turns). So the conversation up to and including a response is::

    conversation(prev) + items + response.output        (prev: None -> nothing before)

Records made by expansion have no ``prev`` (their ``items`` already hold every earlier turn),
so a walk is one read unless a native chain is being continued somewhere else.

Items that go to an OpenAI provider other than the one that made them lose their ``id`` and
``status``: a provider looks up item ids it does not know as its own stored items and refuses
the request. ``reasoning`` items are dropped there too: their encrypted content is only
readable by the provider that wrote it. A translated route takes every item as it is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

MAX_TURNS = 10_000
"""Links followed at most (ids are unique, so a chain has no cycle unless a record was forged;
this bounds the walk anyway)."""

_PORTABLE_DROP = ("id", "status")


class Unavailable(Exception):
    """The conversation cannot be rebuilt; ``args[0]`` says why (for the 400/404)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _portable(item: dict[str, Any]) -> dict[str, Any] | None:
    """An item as another provider can take it as input (None: it cannot)."""
    if item.get("type") == "reasoning":
        return None
    if not any(k in item for k in _PORTABLE_DROP):
        return item
    return {k: v for k, v in item.items() if k not in _PORTABLE_DROP}


def turn_items(record: dict[str, Any], provider: str | None) -> list[dict[str, Any]]:
    """One record's part of the conversation (its input, then its output), as the serving
    ``provider`` can take it. None: a translated route, which takes the items as they are
    (the translation ignores ids, and drops reasoning items itself)."""
    response = record.get("response") or {}
    output = response.get("output") if isinstance(response, dict) else None
    items = [*record.get("items", ()), *(output if isinstance(output, list) else ())]
    own = record.get("kind") == "native" and record.get("provider") == provider
    if provider is None or own:
        return items
    return [p for p in (_portable(i) for i in items if isinstance(i, dict)) if p is not None]


async def conversation(
    record: dict[str, Any],
    fetch: Callable[[str], Awaitable[dict[str, Any] | None]],
    provider: str | None,
) -> list[dict[str, Any]]:
    """Every item of the conversation ending with ``record``'s response, oldest first.

    ``fetch`` reads a record of the same owner (None when absent). Raises ``Unavailable``
    when a record holds no content (a provider-kept response recorded without it) or an
    earlier turn is gone (expired, deleted).
    """
    parts: list[list[dict[str, Any]]] = []
    current: dict[str, Any] | None = record
    for _ in range(MAX_TURNS):
        if current is None:
            break
        if current.get("items") is None or current.get("response") is None:
            raise Unavailable(
                f"response '{current.get('id')}' is kept by its provider only, so its "
                "conversation cannot continue on another model; continue it on a model of "
                "the same provider, or send the earlier turns in input",
                400,
            )
        parts.append(turn_items(current, provider))
        prev = current.get("prev")
        if not prev:
            current = None
            break
        current = await fetch(prev)
        if current is None:
            raise Unavailable(
                f"an earlier response of this conversation ('{prev}') is no longer stored", 404
            )
    else:
        raise Unavailable("the conversation is too long to continue", 400)
    return [item for part in reversed(parts) for item in part]
