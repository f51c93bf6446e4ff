"""The deterministic reply both dialects send, and the token rule.

Replies are deterministic (``"Echo:"`` plus the words of the last user message) so tests can
assert exact output, and tokens follow one rule (whitespace-separated words, at least 1) so
usage metering can be checked by hand. Tool calls instead of text: ``tools``.
"""

from __future__ import annotations

import itertools

_FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")


def _count(text: str) -> int:
    """The emulator's token rule: whitespace-separated words, at least 1."""
    return max(1, len(text.split()))


def _reply(prompt: str, words: int | None, limit: int | None) -> tuple[list[str], bool]:
    """The deterministic reply words and whether ``limit`` cut them short."""
    out = ["Echo:", *prompt.split()]
    if words is not None:
        if len(out) < words:
            out.extend(itertools.islice(itertools.cycle(_FILLER), words - len(out)))
        del out[words:]
    if limit is not None and len(out) > limit:
        del out[limit:]
        return out, True
    return out, False


def _pieces(words: list[str]) -> list[str]:
    """Stream deltas, one per word, that concatenate back to the non-stream text."""
    return [words[0], *(" " + w for w in words[1:])]


def _split(text: str, size: int = 8) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]
