"""A pytest plugin for the SDK suites: each test's outcome and first error line, as JSON.

Loaded into the SDK's own pytest run (``-p``), which has the SDK's ``tests`` package on its
path and not this project, so this module imports nothing of Tollway. It writes
``{node id: {"outcome": ..., "message": ...}}`` to the file ``TOLLWAY_CONFORMANCE_OUT`` names.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

_results: dict[str, dict[str, str]] = {}


def _message(report: pytest.TestReport) -> str:
    """The error's first line (the exception and its text), short enough for a summary."""
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr or "")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first[:300]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _results.setdefault(report.nodeid, {"outcome": "error", "message": ""})
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if report.passed:
            entry["outcome"] = "passed"
        elif report.skipped:
            entry["outcome"] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
            entry["message"] = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else "")
        else:
            entry["outcome"] = "failed" if report.when == "call" else "error"
            entry["message"] = _message(report)
    elif report.when == "teardown" and report.failed:
        entry["outcome"] = "error"
        entry["message"] = entry["message"] or _message(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: Any) -> None:
    out = os.environ.get("TOLLWAY_CONFORMANCE_OUT")
    if out:
        with open(out, "w") as f:
            json.dump(_results, f, indent=0, sort_keys=True)
