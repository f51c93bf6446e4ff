"""privacy: personal data and secrets are redacted from a request before any provider sees it.

Every text a provider would receive is scanned, as ``proxy.texts`` lists them: message
contents of both dialects, system prompts, earlier tool calls' arguments and inputs, tool
results, document texts, tool and schema descriptions, ``response_format`` schemas,
``prediction``, completion prompts and suffixes, embeddings inputs, Responses ``input`` items
of every kind and ``instructions``, ``user`` and ``metadata``. Signed ``thinking`` /
``redacted_thinking`` blocks and encrypted Responses ``reasoning`` items are forwarded
untouched: the provider verifies them, so an edited one would fail the request. What matches one of the
enabled detectors is replaced by a placeholder (``[EMAIL]``, ``[CARD]``, ...), in ``access``,
so everything after this plugin (routing, cache key, coalescing, the provider) sees only the
redacted request: two prompts that differ only in an email address share one cached answer,
and the cache never holds the address.

Detectors are regular expressions with a check where a format has one, so a number that merely
looks like a card or an IBAN is left alone: card numbers (digits grouped by spaces, ``-``,
``.``, ``/`` or double spaces) must pass the Luhn check, IBANs the ISO 7064 mod-97 check, IPv4
octets must be at most 255 (IPv6 addresses are not detected). AWS secret access keys (40
characters of ``[A-Za-z0-9/+]``, nothing of that alphabet, ``=``, ``_`` or ``-`` around them)
are told from other tokens by a rule, see ``aws_secret_ok``. Operators add their own detectors
(``custom: [{name, pattern}]``, e.g. employee ids). The reply says what was removed in
``X-Tollway-Redacted`` (``email=1,card=2``: kinds and counts, never values); ``/metrics``
counts redactions by kind. The originals are not restored in the reply: a model that repeats
a placeholder repeats the placeholder.

Text is normalised before detection, so look-alike characters do not hide anything: zero-width
characters and soft hyphens are removed, Unicode digits read as ASCII digits, and NFKC folds
full-width forms (digits U+FF10-FF19, the at sign U+FF20). This only runs on texts with
non-ASCII characters. A text is first redacted as written; if normalising the result changes
it and reveals more, the normalised text is forwarded with its placeholders (the user's
look-alike characters become their plain forms), otherwise the text as written (with any
placeholders) is forwarded.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import AsyncIterator, Callable
from functools import partial
from itertools import pairwise
from typing import Any, Literal

import orjson
import re2  # type: ignore[import-untyped]
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proxy.appkeys import METRICS
from proxy.context import RequestContext, StashKey
from proxy.hookspecs import hookimpl
from proxy.policy import Loc, Policy, errors_at
from proxy.texts import Slot, data_slots, text_slots

Kind = Literal["email", "phone", "card", "iban", "ssn", "ip", "secret"]

_NOT_AFTER_WORD = r"(?<![\w+][\s\S])"  # right after a first character: no word char before it

# Detectors run in passes, each one regular expression whose every branch starts with the same
# literal or character class: Python's engine then skips to candidate characters in C instead
# of trying every branch at every position (measured: ~4 µs per KB of prose a pass, against
# ~250 for one alternation of all detectors behind word boundaries). Within a pass the first
# branch that matches at a position wins; passes run in this order, each on the previous one's
# output (placeholders contain nothing a later pass matches).
# A branch's label is its kind, or ``kind/variant`` where a variant has its own check.
_AWS_TOKEN = r"[A-Za-z0-9/+]{40}"
PASSES: list[tuple[str | bytes | None, str, list[tuple[str, str]]]] = [
    # (what the text must contain for the pass to run: a substring, or an RE2 pattern as
    # bytes; a common prefix; branches)
    (
        None,
        "",
        [
            (
                "secret",
                r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"
                r"|sk-[A-Za-z0-9][A-Za-z0-9_-]{19,}|pk-[A-Za-z0-9][A-Za-z0-9_-]{19,}"
                r"|rk-[A-Za-z0-9][A-Za-z0-9_-]{19,}"  # OpenAI, Anthropic, Stripe-style keys
                r"|tw_[A-Za-z0-9_-]{32,}"  # Tollway's own keys
                r"|AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}"  # AWS access key ids
                r"|ghp_[A-Za-z0-9]{30,}|gho_[A-Za-z0-9]{30,}|ghu_[A-Za-z0-9]{30,}"
                r"|ghs_[A-Za-z0-9]{30,}|ghr_[A-Za-z0-9]{30,}"  # GitHub tokens
                r"|xoxb-[A-Za-z0-9-]{10,}|xoxp-[A-Za-z0-9-]{10,}|xoxa-[A-Za-z0-9-]{10,}"
                r"|AIza[0-9A-Za-z_-]{35}"  # Google API keys
                r"|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWTs
                r"|Bearer[\s\u00a0]+[A-Za-z0-9._~+/-]{20,}=*"
                r"|bearer[\s\u00a0]+[A-Za-z0-9._~+/-]{20,}=*",
            )
        ],
    ),
    (
        "@",
        "",
        [("email", r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")],
    ),
    (
        None,
        r"[+(0-9]" + _NOT_AFTER_WORD,
        [
            # an address may end a sentence ("... is 10.0.0.1."), not a longer dotted number
            ("ip", r"(?<=[0-9])[0-9]{0,2}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}(?!\w|\.[0-9])"),
            ("ssn", r"(?<=[0-9])[0-9]{2}-[0-9]{2}-[0-9]{4}\b"),
            ("card", r"(?<=[0-9])(?:[ -]?[0-9]){12,18}\b"),
            (
                "phone",
                r"(?<=\+)[1-9][0-9]{0,2}[ .-]?(?:\([0-9]{2,4}\)[ .-]?|[0-9]{2,4}[ .-])"
                r"[0-9]{2,4}[ .-]?[0-9]{3,4}\b"
                r"|(?<=\()[0-9]{2,4}\)[ .-]?[0-9]{2,4}[ .-]?[0-9]{3,4}\b"
                # without a country code or parentheses only the 3-3-4 shape with one kind of
                # separator (415-555-0100): "100 200 3000" in code or data is not a phone number
                r"|(?<=[0-9])[0-9]{2}(?P<sep>[ .-])[0-9]{3}(?P=sep)[0-9]{4}\b",
            ),
            # cards grouped by "." or "/" or double spaces: groups of 3 to 6 digits (the
            # first of 4 to 6), so dates and version numbers never get that far; after the
            # phone branch, which has the 3-3-4 shapes
            ("card", r"(?<=[0-9])[0-9]{3,5}(?:(?: {1,2}|[./-])[0-9]{3,6}){2,4}\b"),
        ],
    ),
    (None, r"[A-Z]" + _NOT_AFTER_WORD, [("iban", r"[A-Z][0-9]{2}(?: ?[A-Z0-9]){11,30}\b")]),
    # AWS secret access keys: a pass of its own behind an RE2 test, since a branch starting
    # with a class of 64 characters would make Python's engine try every position of the text
    (
        rb"(?:^|[^A-Za-z0-9/+])" + _AWS_TOKEN.encode() + rb"(?:$|[^A-Za-z0-9/+=_-])",
        "",
        [("secret/aws", r"(?<![A-Za-z0-9/+_-])" + _AWS_TOKEN + r"(?![A-Za-z0-9/+=_-])")],
    ),
]
ALL_KINDS: tuple[str, ...] = ("secret", "email", "ip", "ssn", "card", "phone", "iban")

# The same detectors without lookarounds, each matching wherever its precise form above does
# (a superset: tests check every sample). Compiled together for RE2, a linear-time engine, they
# decide in one pass whether a text can hold anything at all; most prompts hold nothing, and
# then the passes above never run (measured: 1.2 µs for a short prompt, 2.6 µs per KB, against
# 2.2 µs and ~19 µs per KB for the passes).
LOOSE: dict[str, str] = {
    "secret": (
        r"-----BEGIN|[spr]k-[A-Za-z0-9_-]{19,}|tw_[A-Za-z0-9_-]{32,}|A[KS]IA[0-9A-Z]{16}"
        r"|gh[pousr]_[A-Za-z0-9]{30,}|xox[abp]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}"
        r"|eyJ[A-Za-z0-9_-]{8,}\.|[Bb]earer"
        r"|(?:^|[^A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?:$|[^A-Za-z0-9/+=_-])"
    ),
    "email": r"@",
    "ip": r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}",
    "ssn": r"[0-9]{3}-[0-9]{2}-[0-9]{4}",
    "card": r"[0-9](?:(?: {1,2}|[./-])?[0-9]){12,18}",
    "phone": (
        r"\+[1-9][0-9]{0,2}[ .-]?(?:\([0-9]{2,4}\)[ .-]?|[0-9]{2,4}[ .-])[0-9]{2,4}[ .-]?[0-9]{3,4}"
        r"|\([0-9]{2,4}\)[ .-]?[0-9]{2,4}[ .-]?[0-9]{3,4}"
        r"|[0-9]{2,4}[ .-][0-9]{2,4}[ .-]?[0-9]{3,4}"
    ),
    "iban": r"[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}",
}


def luhn(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    """ISO 13616 IBAN check: move the first four characters to the end, read letters as
    10..35, and the number mod 97 must be 1."""
    s = text.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


_CARD_SEPARATORS = str.maketrans("", "", " -./")


def _card_ok(text: str) -> bool:
    digits = text.translate(_CARD_SEPARATORS)
    return 13 <= len(digits) <= 19 and luhn(digits)


_HEX = frozenset("0123456789abcdefABCDEF")


def _char_class(c: str) -> int:
    return 0 if c.isupper() else 1 if c.islower() else 2 if c.isdigit() else 3


def aws_secret_ok(m: re.Match[str]) -> bool:
    """Whether a 40-character token of ``[A-Za-z0-9/+]`` (nothing of that alphabet, ``=``,
    ``_`` or ``-`` around it) is an AWS secret access key. Never when it is all hexadecimal
    (a git SHA-1 or another hex digest; AWS secrets are base64 and practically always hold
    non-hex characters). Then either the word "secret" (any case: ``aws_secret_access_key``,
    ``AWS_SECRET``, ``SecretAccessKey``) is in the 40 characters before it, or it mixes
    upper case, lower case and digits and changes class (upper/lower/digit) between
    neighbouring letters and digits at least 10 times: a random key does ~23 times, fewer
    than 10 in 1 in 10,000; words, paths and most identifiers far fewer. Base64 of other
    lengths is never 40 characters bounded this way (a 29-byte value ends in ``=``)."""
    token = m.group()
    if _HEX.issuperset(token):
        return False
    text, start = m.string, m.start()
    if "secret" in text[max(0, start - 40) : start].lower():
        return True
    classes = [_char_class(c) for c in token]
    if not {0, 1, 2} <= set(classes):
        return False
    changes = sum(1 for a, b in pairwise(classes) if a != b and a != 3 and b != 3)
    return changes >= 10


def _phone_ok(text: str) -> bool:
    return 9 <= sum(c.isdigit() for c in text) <= 15


def _ip_ok(text: str) -> bool:
    return all(int(octet) <= 255 for octet in text.split("."))


def _ssn_ok(text: str) -> bool:
    area, group, serial = text.split("-")
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


CHECKS: dict[str, Callable[[str], bool]] = {
    "card": _card_ok,
    "iban": iban_ok,
    "phone": _phone_ok,
    "ip": _ip_ok,
    "ssn": _ssn_ok,
}
# checks that need the match's surroundings, by branch label
MATCH_CHECKS: dict[str, Callable[[re.Match[str]], bool]] = {"secret/aws": aws_secret_ok}

# Characters removed before detection (zero-width space, non-joiner, joiner, word joiner,
# invisible operators, BOM, soft hyphen, Mongolian vowel separator) and every decimal digit of
# the Basic Multilingual Plane mapped to its ASCII digit (NFKC folds the full-width and the
# mathematical ones but not, e.g., Arabic-Indic). The test for them is a class of ranges within
# the BMP: one character outside it would make Python's engine compare each position with every
# member of the class (~40 µs for a short text, against 0.3).
_FOLD: dict[int, int | None] = dict.fromkeys(
    [0x00AD, 0x180E, 0x200B, 0x200C, 0x200D, 0x2060, 0x2061, 0x2062, 0x2063, 0x2064, 0xFEFF]
)
_FOLD.update(
    (c, 48 + unicodedata.digit(chr(c)))
    for c in range(0x80, 0x10000)
    if unicodedata.category(chr(c)) == "Nd"
)


def _char_class_of(codes: list[int]) -> str:
    """A regular-expression class of ``codes``, consecutive runs written as ranges."""
    runs: list[list[int]] = []
    for c in sorted(codes):
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return "[" + "".join(f"\\u{a:04x}" + (f"-\\u{b:04x}" if b > a else "") for a, b in runs) + "]"


_NEEDS_FOLD = re.compile(_char_class_of(list(_FOLD)))


def normalise(text: str) -> str:
    """``text`` as detectors read it: folded (see ``_FOLD``), then NFKC. Only for texts with
    non-ASCII characters (ASCII is its own normal form)."""
    if _NEEDS_FOLD.search(text) is not None:
        text = text.translate(_FOLD)
    return unicodedata.normalize("NFKC", text)


class CustomPattern(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="The kind's name (placeholder).")
    pattern: str = Field(description="A Python regular expression.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            if re.compile(v).match(""):
                raise ValueError("the pattern matches the empty string")
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
        return v


class PrivacyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    redact: list[Kind] = Field(
        default_factory=lambda: list(ALL_KINDS),  # type: ignore[arg-type]
        description="Built-in detectors to run: email, phone, card, iban, ssn, ip, secret.",
    )
    custom: list[CustomPattern] = Field(
        default_factory=list, description="Extra detectors: [{name, pattern}]."
    )
    placeholder: str = Field(
        "[{KIND}]", description="Replacement text; {KIND} / {kind} is the detector's name."
    )
    skip_features: list[str] = Field(
        default_factory=list, description="Features (request types) sent unredacted."
    )

    @model_validator(mode="after")
    def _names_once(self) -> PrivacyConfig:
        # a detector's name is its placeholder and its count's label: one detector each
        seen: set[str] = set()
        errors: list[tuple[Loc, str]] = []
        for loc, name in [
            *((("redact", i), k) for i, k in enumerate(self.redact)),
            *((("custom", i, "name"), c.name) for i, c in enumerate(self.custom)),
        ]:
            if name in seen:
                errors.append((loc, f"detector name {name!r} is used twice (or is a built-in's)"))
            seen.add(name)
        if errors:
            raise errors_at("PrivacyConfig", errors)
        return self


class Redactor:
    """The enabled detectors as compiled passes; ``redact(text, counts)`` counts by kind."""

    def __init__(self, kinds: list[str], custom: list[CustomPattern], placeholder: str) -> None:
        builtin = [
            (needle, prefix, [(k, p) for k, p in branches if k.partition("/")[0] in kinds])
            for needle, prefix, branches in PASSES
        ]
        # ASCII classes (\w, \s, \b) as in RE2's gate, which must match wherever they do
        self.passes = self._compile(builtin, re.ASCII)
        self.custom = self._compile([(None, "", [(c.name, c.pattern)]) for c in custom])
        loose = [LOOSE[k] for k in ALL_KINDS if k in kinds]
        # compiled from bytes and given bytes: the wrapper's str path converts offsets in Python
        self.gate = re2.compile("|".join(f"(?:{p})" for p in loose).encode()) if loose else None
        labels = [k for _, _, ks in self.passes + self.custom for k in ks]
        names = list(dict.fromkeys(label.partition("/")[0] for label in labels))
        self.names = names
        self.replacement = {
            name: placeholder.replace("{KIND}", name.upper()).replace("{kind}", name)
            for name in names
        }

    @staticmethod
    def _compile(
        passes: list[tuple[str | bytes | None, str, list[tuple[str, str]]]], flags: int = 0
    ) -> list[tuple[Any, re.Pattern[str], list[str]]]:
        out = []
        for needle, prefix, branches in passes:
            if branches:
                alternation = "|".join(f"(?P<k{i}>{p})" for i, (_, p) in enumerate(branches))
                regex = re.compile(f"{prefix}(?:{alternation})" if prefix else alternation, flags)
                test = re2.compile(needle) if isinstance(needle, bytes) else needle
                out.append((test, regex, [k for k, _ in branches]))
        return out

    def may_match(self, text: str) -> bool:
        """False when no built-in detector can match anywhere in ``text`` as written or
        normalised (one RE2 pass each). Custom detectors are not in the gate (they may use
        lookarounds, which RE2 lacks)."""
        gate = self.gate
        if gate is None:
            return False
        if gate.search(text.encode()) is not None:
            return True
        if text.isascii():
            return False
        folded = normalise(text)
        return folded != text and gate.search(folded.encode()) is not None

    def redact(self, text: str, counts: dict[str, int], builtin: bool | None = None) -> str:
        """``text`` with every match replaced, as written and then normalised (see the module
        docstring). ``builtin``: whether the built-in detectors may match, when the caller
        already asked ``may_match`` (None: ask it here)."""
        if builtin is None:
            builtin = self.may_match(text)
        out = self._redact(text, counts, builtin)
        if out.isascii():
            return out
        folded = normalise(out)
        if folded == out:
            return out
        more: dict[str, int] = {}
        folded = self._redact(folded, more, builtin)
        if not more:
            return out  # normalising revealed nothing: the text as written goes
        for kind, n in more.items():
            counts[kind] = counts.get(kind, 0) + n
        return folded

    def _redact(self, text: str, counts: dict[str, int], builtin: bool) -> str:
        if builtin:
            text = self._run(self.passes, text, counts)
        if self.custom:
            text = self._run(self.custom, text, counts)
        return text

    def _run(
        self,
        passes: list[tuple[Any, re.Pattern[str], list[str]]],
        text: str,
        counts: dict[str, int],
    ) -> str:
        for test, regex, labels in passes:
            if test is not None:
                if type(test) is str:
                    if test not in text:
                        continue
                elif test.search(text.encode()) is None:
                    continue
            if regex.search(text) is None:  # the common case: no candidate, nothing to build
                continue
            text = regex.sub(partial(self._replace, labels, counts), text)
        return text

    def _replace(self, labels: list[str], counts: dict[str, int], m: re.Match[str]) -> str:
        label = labels[int(m.lastgroup[1:])]  # type: ignore[index]
        found = m.group()
        kind = label.partition("/")[0]
        check = CHECKS.get(kind)
        if check is not None and not check(found.lstrip("+(")):
            return found
        match_check = MATCH_CHECKS.get(label)
        if match_check is not None and not match_check(m):
            return found
        counts[kind] = counts.get(kind, 0) + 1
        return self.replacement[kind]


def _decode(
    json_texts: list[Slot], slots: list[Slot]
) -> list[tuple[Any, Any, list[Any], int, int]]:
    """Tool-call arguments are JSON text: their strings are scanned decoded (a JSON escape
    such as ``\\n`` or ``\\uff20`` would hide a value from the detectors, and a placeholder
    put over half an escape would break the JSON). Appends their strings' slots to ``slots``;
    returns ``(container, key, holder, first, end)`` for each: the decoded value is
    ``holder[0]``, its slots ``slots[first:end]``. Arguments that are not JSON are text."""
    decoded = []
    for container, key in json_texts:
        try:
            holder, inner = data_slots(orjson.loads(container[key]))
        except (orjson.JSONDecodeError, RecursionError):
            slots.append((container, key))
            continue
        decoded.append((container, key, holder, len(slots), len(slots) + len(inner)))
        slots.extend(inner)
    return decoded


def _encode(value: Any, raw: str, edits: list[tuple[str, str]], redactor: Redactor) -> str:
    """Redacted arguments as JSON text. Each changed string is replaced where the raw text
    holds it encoded as orjson would (quotes included), so the rest keeps its layout; if one
    is written otherwise (escaped non-ASCII...), the whole value is written anew, compact. If
    the value cannot be written, the raw text is redacted as text."""
    for old, new in dict(edits).items():  # a value found twice is replaced once
        quoted = orjson.dumps(old).decode()
        if quoted not in raw:
            break
        raw = raw.replace(quoted, orjson.dumps(new).decode())
    else:
        return raw
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return redactor.redact(raw, {}, True)


_REDACTED: StashKey[str] = StashKey()
"""What ``access`` redacted (``email=1,phone=2``): the reply's ``X-Tollway-Redacted`` header."""


class PrivacyPlugin:
    """Redacts the request in ``access``; see the module docstring."""

    Config = PrivacyConfig

    def __init__(self, config: PrivacyConfig, policy: Policy) -> None:
        self.redactor = Redactor(list(config.redact), list(config.custom), config.placeholder)
        self.skip = frozenset(config.skip_features)
        self.redactions: dict[str, int] = dict.fromkeys(self.redactor.names, 0)
        self.requests = 0

    @hookimpl
    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        app[METRICS].add(
            "privacy",
            lambda: {
                "tollway_redactions": (
                    "counter",
                    "Personal data and secrets removed from requests, by kind.",
                    {(k,): v for k, v in self.redactions.items()},
                    ("kind",),
                ),
                "tollway_redacted_requests": (
                    "counter",
                    "Requests that had something redacted.",
                    self.requests,
                    (),
                ),
            },
        )
        yield

    @hookimpl
    async def access(self, ctx: RequestContext) -> None:
        if ctx.feature in self.skip:
            return
        json_texts: list[Slot] = []
        slots = text_slots(ctx.body, json_texts)
        decoded = _decode(json_texts, slots) if json_texts else []
        if not slots:
            return
        redactor = self.redactor
        texts = [c[k] for c, k in slots]
        # one gate over everything: most requests hold nothing to redact and stop here
        builtin = redactor.may_match(texts[0] if len(texts) == 1 else "\n".join(texts))
        if not builtin and not redactor.custom:
            return
        counts: dict[str, int] = {}
        redact = redactor.redact
        changed: list[int] = []
        for i, ((container, key), text) in enumerate(zip(slots, texts, strict=True)):
            out = redact(text, counts, builtin)
            if out is not text:
                container[key] = out
                changed.append(i)
        for container, key, holder, first, end in decoded:
            edits = [(texts[i], slots[i][0][slots[i][1]]) for i in changed if first <= i < end]
            if edits:
                container[key] = _encode(holder[0], container[key], edits, redactor)
        if counts:
            self.requests += 1
            for kind, n in counts.items():
                self.redactions[kind] += n
            ctx.stash[_REDACTED] = ",".join(f"{k}={n}" for k, n in sorted(counts.items()))

    @hookimpl
    async def response_headers(self, ctx: RequestContext, headers: dict[str, str]) -> None:
        redacted = ctx.stash.get(_REDACTED)
        if redacted is not None:
            headers["X-Tollway-Redacted"] = redacted
