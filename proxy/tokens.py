"""Token counts of provider replies: the one reader of every usage shape both dialects send.

Metering bills, limits charge and the cache records the same two numbers, input and output
tokens, whether a reply came whole, streamed, translated or from the cache; reading them in one
place keeps those figures equal. The shapes read:

- OpenAI chat and legacy completions: ``usage.prompt_tokens`` and ``completion_tokens``.
  Cached prompt tokens (``prompt_tokens_details.cached_tokens``) are already part of
  ``prompt_tokens``, and reasoning tokens (``completion_tokens_details.reasoning_tokens``) part
  of ``completion_tokens``, so both are billed without being read apart.
- OpenAI embeddings: ``prompt_tokens`` only; no output.
- OpenAI streams: with ``stream_options.include_usage`` every chunk carries ``"usage": null``
  and the last one (``"choices": []``) the usage object; ``openai_chunk_tokens`` finds it
  without parsing the chunks before it.
- OpenAI Responses: ``usage.input_tokens`` and ``output_tokens`` (cached input tokens
  already part of the first, reasoning tokens of the second, as in chat); a stream carries
  them in its closing ``response.completed`` (or ``response.incomplete``) event's
  ``response.usage``.
- Anthropic messages: ``input_tokens`` leaves out cache writes and reads
  (``cache_creation_input_tokens``, ``cache_read_input_tokens``); they are prompt tokens all the
  same, so input is the three summed, as OpenAI's ``prompt_tokens`` counts them. Thinking is
  part of ``output_tokens``.
- Anthropic streams: ``message_start`` carries ``message.usage`` with the input counts and a
  placeholder output count (usually 1); ``message_delta`` carries cumulative counts: the
  closing output count and, when the provider re-counts them (server tools), the input counts,
  which then replace the start's. A count that is absent or null was not reported: the figure
  seen before stands (see ``read_anthropic_event``).
- Anthropic's token count (``/v1/messages/count_tokens``): a top-level ``input_tokens`` and no
  usage object (``count_reply_tokens``); the usage row records it as the count's input tokens.

A count that is absent or null reads as 0 (in a stream event: as not reported); counts go
through ``int()`` (a provider's 12.0 is 12). A usage that is not an object is no usage: the readers say so (``None``, ``False``) so the
caller can tell "not reported" from "reported as 0". Anything else malformed (a non-numeric
count, a non-object ``message``) raises ``ValueError``, ``TypeError`` or ``AttributeError``,
which the relay treats as a malformed reply or stream.

No I/O, no state of their own. The stream readers run per usage-bearing event (a few per
stream), so each is a handful of dict lookups; ``read_anthropic_event`` updates the caller's
counts in place (``ctx.usage`` itself in the relay) because building and unpacking tuples there
measurably cost more than the inline code this module replaced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import orjson

if TYPE_CHECKING:
    from proxy.context import Dialect

Tokens = tuple[int, int]
"""``(input, output)`` tokens, as ``ctx.usage`` and the usage table count them."""


class Counts(Protocol):
    """Running counts of a stream: ``proxy.context.Usage`` (``ctx.usage``) is one."""

    input_tokens: int
    output_tokens: int


def openai_tokens(usage: dict[str, Any]) -> Tokens:
    """``(input, output)`` of an OpenAI usage object (chat, completions or embeddings)."""
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def responses_tokens(usage: dict[str, Any]) -> Tokens:
    """``(input, output)`` of an OpenAI Responses usage object."""
    return int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)


def anthropic_input(usage: dict[str, Any]) -> int:
    """Input tokens of an Anthropic usage object: fresh, cache-written and cache-read summed."""
    return (
        int(usage.get("input_tokens") or 0)
        + int(usage.get("cache_creation_input_tokens") or 0)
        + int(usage.get("cache_read_input_tokens") or 0)
    )


def anthropic_tokens(usage: dict[str, Any]) -> Tokens:
    """``(input, output)`` of an Anthropic usage object (cache tokens counted as input)."""
    return anthropic_input(usage), int(usage.get("output_tokens") or 0)


def anthropic_cached(usage: dict[str, Any]) -> int:
    """The cache-read part of an Anthropic input count: OpenAI's ``cached_tokens``."""
    return int(usage.get("cache_read_input_tokens") or 0)


def count_reply_tokens(body: dict[str, Any]) -> Tokens:
    """``(input, 0)`` of a token count's reply (``{"input_tokens": N}``): nothing is generated."""
    return int(body.get("input_tokens") or 0), 0


def reply_tokens(body: dict[str, Any], dialect: Dialect | None = None) -> Tokens | None:
    """``(input, output)`` of a whole reply, or ``None`` if it carries no usage object.

    ``dialect`` is the shape of the reply when the caller knows it (the provider's kind);
    ``None`` reads it from the usage keys (``prompt_tokens``/``completion_tokens`` are
    OpenAI chat's, ``total_tokens`` without them a Response's), for a stored reply whatever
    dialect or endpoint it was kept in.
    """
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return None
    if dialect is None:
        openai = "prompt_tokens" in usage or "completion_tokens" in usage
        if not openai and "total_tokens" in usage:  # a Response's (Anthropic's has no total)
            return responses_tokens(usage)
        dialect = "openai" if openai else "anthropic"
    if dialect == "anthropic":
        return anthropic_tokens(usage)
    return openai_tokens(usage)


def read_anthropic_event(kind: str | None, data: dict[str, Any], counts: Counts) -> bool:
    """Update ``counts`` from one Anthropic stream event of type ``kind``; ``False`` (counts
    untouched) if it carries no usage: every event but message_start and message_delta.

    Both events are read alike, as cumulative figures: the input count is replaced only if
    ``input_tokens`` is reported, the output count only if ``output_tokens`` is. So
    message_start's placeholder output stands until message_delta's closing count arrives,
    and a message_delta without input counts keeps message_start's. Whether a count is final
    (message_delta) is the caller's to record.
    """
    if kind == "message_delta":
        usage = data.get("usage")
    elif kind == "message_start":
        usage = (data.get("message") or {}).get("usage")
    else:
        return False
    if not isinstance(usage, dict):
        return False
    if usage.get("input_tokens") is not None:
        counts.input_tokens = anthropic_input(usage)
    output = usage.get("output_tokens")
    if output is not None:
        counts.output_tokens = int(output)
    return True


def openai_chunk_tokens(data: bytes) -> Tokens | None:
    """``(input, output)`` if this raw OpenAI stream chunk carries a usage object, else None.

    With include_usage every chunk has ``"usage": null`` and only the last an object, so a
    substring test skips JSON parsing for all the others (a relay without chunk hooks parses
    no other chunk). A chunk that is not JSON is no usage here: the relay forwards it as is.
    """
    i = data.find(b'"usage"')
    if i < 0:
        return None
    rest = data[i + 7 : i + 16].lstrip(b": ")
    if rest.startswith(b"null"):
        return None
    try:
        usage = orjson.loads(data).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(usage, dict):
        return None
    return openai_tokens(usage)
