"""The expectations files: their format, the comparison CI fails on, and the committed lists."""

from __future__ import annotations

import pytest

from conformance import expected as exp
from conformance.run import expected_path
from conformance.suites import SUITES

A, B, C, D = (f"tests/api_resources/test_x.py::TestX::test_{n}[loose]" for n in "abcd")


def test_parse_reads_passes_failures_and_reasons() -> None:
    listed = exp.parse(f"# openai 1.2.3: header\n\nPASS {A}\nFAIL {B}  # out of scope\n# note\n")
    assert listed.status == {A: "PASS", B: "FAIL"}
    assert listed.reasons == {B: "out of scope"}
    assert listed.header == ["# openai 1.2.3: header"]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (f"FAIL {A}\n", "needs its reason"),
        (f"FAIL {A}  #   \n", "needs its reason"),
        (f"SKIP {A}\n", "expected 'PASS id'"),
        ("PASS\n", "expected 'PASS id'"),
        (f"PASS {A}\nFAIL {A}  # why\n", "listed twice"),
    ],
)
def test_parse_names_the_bad_line(text: str, says: str) -> None:
    with pytest.raises(exp.ListError, match=says) as info:
        exp.parse(text, "expected-openai.txt")
    assert "expected-openai.txt:" in str(info.value)


def test_compare_fails_only_on_a_listed_pass_that_does_not_pass() -> None:
    listed = exp.parse(f"PASS {A}\nPASS {B}\nFAIL {C}  # why\nPASS {D}\n")
    outcomes = {A: "passed", B: "failed", C: "passed", "new": "skipped"}
    result = exp.compare(listed, outcomes)
    assert result.regressions == [B]
    assert result.newly_passing == [C]
    assert result.unknown == ["new"]
    assert result.missing == [D]
    assert not result.ok
    assert exp.compare(listed, {**outcomes, B: "passed"}).ok


@pytest.mark.parametrize("outcome", ["failed", "error", "skipped", "xfailed"])
def test_anything_but_passed_is_a_regression(outcome: str) -> None:
    assert exp.compare(exp.parse(f"PASS {A}\n"), {A: outcome}).regressions == [A]


def test_render_keeps_reasons_and_marks_new_failures() -> None:
    text = exp.render(["# h"], {A: "passed", B: "failed", C: "error"}, {B: "out of scope"})
    again = exp.parse(text)
    assert again.status == {A: "PASS", B: "FAIL", C: "FAIL"}
    assert again.reasons == {B: "out of scope", C: exp.UNEXPLAINED}
    assert again.header == ["# h"]


@pytest.mark.parametrize("sdk", sorted(SUITES))
def test_committed_list_explains_every_failure(sdk: str) -> None:
    """The committed lists parse, every FAIL has a real reason, every id is from a file the
    suite runs, and they expect something to pass (an empty list would check nothing)."""
    listed = exp.load(expected_path(sdk))
    assert listed.status, f"{expected_path(sdk).name} is missing or empty"
    assert "PASS" in listed.status.values()
    assert exp.UNEXPLAINED not in listed.reasons.values()
    files = set(SUITES[sdk].files)
    assert {test_id.split("::")[0] for test_id in listed.status} <= files
