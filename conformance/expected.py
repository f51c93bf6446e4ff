"""The committed expectations: which SDK tests pass through the gateway, and why the rest fail.

One line per test id (pytest's node id)::

    PASS tests/api_resources/test_models.py::TestModels::test_method_list[loose]
    FAIL tests/api_resources/test_models.py::TestModels::test_method_delete[loose]  # why

Every FAIL carries its reason after ``  # ``; lines starting with ``#`` are comments. The
comparison is one-sided on purpose: a test listed PASS that fails now is a regression (the
run fails); a FAIL that passes now is progress, reported so the list gets updated, and a test
the list does not know yet (a new SDK version) is reported, not failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PASSED = "passed"
"""The one outcome that counts as a pass (a skip is not one: the SDK did not check anything)."""

UNEXPLAINED = "not yet explained"
"""The reason ``--update`` gives a new failure, for a person to replace with the real one."""


class ListError(ValueError):
    """A malformed expectations file (the line is named)."""


@dataclass
class Expected:
    """A parsed expectations file: id -> "PASS"/"FAIL", and the reason of each FAIL."""

    status: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    header: list[str] = field(default_factory=list)


def parse(text: str, name: str = "expected list") -> Expected:
    """Read an expectations file; a line that is neither PASS, FAIL nor a comment is an error."""
    out = Expected()
    seen_entry = False
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            if not seen_entry:
                out.header.append(raw.rstrip())
            continue
        seen_entry = True
        word, _, rest = line.partition(" ")
        test_id, _, reason = rest.partition("  #")
        test_id, reason = test_id.strip(), reason.strip()
        if word not in ("PASS", "FAIL") or not test_id or " " in test_id:
            raise ListError(f"{name}:{number}: expected 'PASS id' or 'FAIL id  # reason': {raw!r}")
        if word == "FAIL" and not reason:
            raise ListError(f"{name}:{number}: a FAIL needs its reason after '  # ': {raw!r}")
        if test_id in out.status:
            raise ListError(f"{name}:{number}: {test_id} is listed twice")
        out.status[test_id] = word
        if reason:
            out.reasons[test_id] = reason
    return out


def load(path: Path) -> Expected:
    """The expectations in ``path``; an empty list when the file does not exist yet."""
    if not path.exists():
        return Expected()
    return parse(path.read_text(), path.name)


@dataclass
class Comparison:
    """A run's outcomes against the expectations (every list sorted by test id)."""

    regressions: list[str]
    """Listed PASS, did not pass now: the run fails."""
    newly_passing: list[str]
    """Listed FAIL, passed now: update the list."""
    unknown: list[str]
    """Ran, but not in the list (new tests of a newer SDK)."""
    missing: list[str]
    """In the list, but did not run (renamed or removed tests)."""

    @property
    def ok(self) -> bool:
        return not self.regressions


def compare(expected: Expected, outcomes: dict[str, str]) -> Comparison:
    """Compare ``outcomes`` (test id -> pytest outcome) with ``expected``."""
    regressions, newly, unknown = [], [], []
    for test_id, outcome in sorted(outcomes.items()):
        listed = expected.status.get(test_id)
        if listed is None:
            unknown.append(test_id)
        elif listed == "PASS" and outcome != PASSED:
            regressions.append(test_id)
        elif listed == "FAIL" and outcome == PASSED:
            newly.append(test_id)
    missing = sorted(set(expected.status) - set(outcomes))
    return Comparison(regressions, newly, unknown, missing)


def render(header: list[str], outcomes: dict[str, str], reasons: dict[str, str]) -> str:
    """The expectations file for ``outcomes``: a FAIL keeps its reason from ``reasons`` (the
    previous list), a new one gets :data:`UNEXPLAINED`."""
    lines = list(header)
    for test_id, outcome in sorted(outcomes.items()):
        if outcome == PASSED:
            lines.append(f"PASS {test_id}")
        else:
            lines.append(f"FAIL {test_id}  # {reasons.get(test_id, UNEXPLAINED)}")
    return "\n".join(lines) + "\n"
