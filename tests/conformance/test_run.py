"""The conformance runner's machinery, without the network: its policy, a suite's outcomes
through the outcome plugin, a suite that cannot run, and a download that cannot be had."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from anthropic.resources.messages import DEPRECATED_MODELS

from conformance import expected as exp
from conformance.run import ConformanceError, policy_text, ready, run_suite
from conformance.suites import Suite
from proxy.chain import compile_chain
from proxy.policy import load_text
from tests.procs import ROOT


def test_policy_loads_and_serves_what_the_suites_send(tmp_path: Path) -> None:
    """The policy the run starts its gateway with is valid for the current schema and chain,
    accepts the keys the SDK suites send, and lists the models they name."""
    loaded = load_text(policy_text("http://127.0.0.1:1", tmp_path), base=tmp_path)
    compile_chain(loaded)
    policy = loaded.policy
    declared = next(c for c in policy.chain if c.name == "auth").config["keys"]
    hashes = {k["sha256"] for k in declared}
    for key in ("My API Key", "my-anthropic-api-key"):  # the suites' conftest.py
        assert hashlib.sha256(key.encode()).hexdigest() in hashes
    for model in ("gpt-6.2-astra", "claude-opus-5-5", "text-embedding-3-small", *DEPRECATED_MODELS):
        assert model in policy.models
    assert policy.tiers["conformance"].models is None  # every model


PROBE = """
import os

def test_sees_its_server():
    assert os.environ["TEST_API_BASE_URL"] == "http://127.0.0.1:9/v1"

def test_fails():
    assert 1 == 2

def test_skips():
    import pytest
    pytest.skip("not here")
"""


def _suite_root(tmp_path: Path, body: str) -> Path:
    root = tmp_path / "sdk-1.0"
    (root / "tests").mkdir(parents=True)
    (root / "tests" / "__init__.py").write_text("")
    (root / "tests" / "test_probe.py").write_text(textwrap.dedent(body))
    ready(root)
    return root


def test_a_suite_reports_each_test_and_a_regression_is_found(tmp_path: Path) -> None:
    root = _suite_root(tmp_path, PROBE)
    suite = Suite(dist="sdk", files=("tests/test_probe.py",), base_path="/v1")
    run = run_suite("sdk", suite, root, "http://127.0.0.1:9", "gateway", tmp_path / "logs")
    ids = {k.rpartition("::")[2]: v for k, v in run.results.items()}
    assert ids["test_sees_its_server"]["outcome"] == "passed"
    assert ids["test_fails"]["outcome"] == "failed"
    assert "assert 1 == 2" in ids["test_fails"]["message"]
    assert ids["test_skips"]["outcome"] == "skipped"
    assert run.passed == 1
    listed = exp.parse("".join(f"PASS {k}\n" for k in run.results))
    result = exp.compare(listed, run.outcomes())
    assert sorted(t.rpartition("::")[2] for t in result.regressions) == ["test_fails", "test_skips"]


def test_a_suite_that_cannot_run_is_an_error(tmp_path: Path) -> None:
    """A file that does not import is no pass list at all: the run fails, naming it."""
    root = _suite_root(tmp_path, "import no_such_module_here\n")
    suite = Suite(dist="sdk", files=("tests/test_probe.py",), base_path="")
    with pytest.raises(ConformanceError, match="pytest exited 2") as info:
        run_suite("sdk", suite, root, "http://127.0.0.1:9", "emulator", tmp_path / "logs")
    assert "no_such_module_here" in str(info.value)


@pytest.mark.parametrize(("ci", "status", "says"), [("true", 1, "FAILED"), ("", 0, "SKIPPED")])
def test_no_download_fails_under_ci_and_skips_elsewhere(
    tmp_path: Path, ci: str, status: int, says: str
) -> None:
    """With no package index (PIP_NO_INDEX) and an empty cache the sdists cannot be had:
    under CI=true the step fails loudly, elsewhere it says it skipped."""
    env = {**os.environ, "CI": ci, "PIP_NO_INDEX": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "conformance.run", "--cache", str(tmp_path / "cache")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert f"CONFORMANCE {says}" in proc.stderr
    assert "openai" in proc.stderr or "anthropic" in proc.stderr
