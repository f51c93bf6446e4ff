"""Run the SDKs' API tests through a gateway and against the emulator alone; compare.

    python -m conformance.run                 # both SDKs, both targets, compare (CI)
    python -m conformance.run --sdk openai --target gateway
    python -m conformance.run --update        # rewrite expected-*.txt, keeping the reasons

Steps: fetch the sdists of the installed ``openai`` and ``anthropic`` (cached in
``.cache/conformance``), install what their test helpers import if it is missing, start
``tollway emulator`` and ``tollway serve`` with ``conformance/policy.yaml``, run the chosen
test files of each SDK once through the gateway and once against the emulator, and compare
the gateway run with ``conformance/expected-<sdk>.txt``.

Exit status: 0 when every test listed PASS passed through the gateway; 1 on a regression, on
a suite that could not run, or (under ``CI=true``) when the sdists cannot be downloaded.
Without CI a machine with no network skips, saying so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.procs import LISTENING, TOLLWAY, NotPrinted, Proc
from conformance import expected as exp
from conformance.sdists import FetchError, download, extract_tests, installed_version
from conformance.suites import PYTEST_INI, SUITES, TEST_DEPENDENCIES, Suite

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_CACHE = ROOT / ".cache" / "conformance"
REPORT_MODULE = "_tollway_conformance_report"
"""The name the outcome plugin gets inside an SDK's test folder (imported with ``-p``)."""
TARGETS = ("gateway", "emulator")
LIST_LIMIT = 8
"""Test ids printed per informational list (regressions and new passes are printed whole)."""
SUITE_TIMEOUT = 900.0
"""Seconds one suite may run: a hung server must not hold CI until its own limit."""


class ConformanceError(Exception):
    """The run cannot give an answer (a server did not start, a suite did not run)."""


@dataclass
class Outcomes:
    """One suite's run against one target: test id -> outcome and first error line."""

    sdk: str
    target: str
    results: dict[str, dict[str, str]]
    log: Path
    seconds: float

    def outcomes(self) -> dict[str, str]:
        return {k: v["outcome"] for k, v in self.results.items()}

    @property
    def passed(self) -> int:
        return sum(1 for v in self.results.values() if v["outcome"] == exp.PASSED)


def ensure_dependencies() -> None:
    """Install the suites' test helpers into this interpreter's environment if missing
    (``make`` installs them through pyproject's ``test`` extra; this covers a venv made
    before they were added)."""
    missing = [
        req for mod, req in TEST_DEPENDENCIES.items() if importlib.util.find_spec(mod) is None
    ]
    if not missing:
        return
    print(f"installing the SDK suites' test dependencies: {' '.join(missing)}", flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    proc = subprocess.run([*cmd, *missing], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise FetchError(f"pip could not install {missing}: {proc.stderr.strip()[-500:]}")


def prepare(suite: Suite, cache: Path) -> tuple[str, Path]:
    """The installed version of ``suite``'s SDK and the folder with its extracted tests,
    readied to run: our pytest configuration and outcome plugin beside its ``tests``."""
    version = installed_version(suite.dist)
    root = extract_tests(download(cache, suite.dist, version), cache / "src")
    ready(root)
    return version, root


def ready(root: Path) -> None:
    """Put our pytest configuration and outcome plugin beside the ``tests`` of ``root``."""
    (root / "tollway-conformance.ini").write_text(PYTEST_INI)
    (root / f"{REPORT_MODULE}.py").write_text((HERE / "report_plugin.py").read_text())


def suite_env(base_url: str, out: Path) -> dict[str, str]:
    """The environment of an SDK's pytest: its server, and none of this machine's SDK
    settings (an ``OPENAI_ORG_ID`` or ``ANTHROPIC_BASE_URL`` would change the requests)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "ANTHROPIC_", "PYTEST_", "TEST_API_"))
    }
    env.update(TEST_API_BASE_URL=base_url, TOLLWAY_CONFORMANCE_OUT=str(out))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_suite(sdk: str, suite: Suite, root: Path, origin: str, target: str, logs: Path) -> Outcomes:
    """Run ``suite``'s files in ``root`` against the server at ``origin``."""
    logs.mkdir(parents=True, exist_ok=True)
    out, log = logs / f"{sdk}-{target}.json", logs / f"{sdk}-{target}.log"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", *suite.files, *suite.pytest_args]
    cmd += ["-c", "tollway-conformance.ini", "--rootdir", str(root), "-p", REPORT_MODULE]
    cmd += ["-p", "no:cacheprovider", "-q", "--tb=short", "-rfE"]
    started = time.monotonic()
    with log.open("w") as f:
        try:
            proc = subprocess.run(
                cmd,
                cwd=root,
                env=suite_env(origin + suite.base_path, out),
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=SUITE_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ConformanceError(
                f"{sdk} against the {target} ran over {SUITE_TIMEOUT:.0f}s; log: {log}"
            ) from exc
    # 0: all passed, 1: some failed; anything else (a collection error, a usage error, no
    # test collected) means the suite did not really run
    if proc.returncode not in (0, 1) or not out.exists():
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise ConformanceError(
            f"{sdk} against the {target}: pytest exited {proc.returncode}:\n{tail}"
        )
    elapsed = time.monotonic() - started
    return Outcomes(sdk, target, json.loads(out.read_text()), log, elapsed)


def _start(args: list[str], name: str) -> tuple[Proc, str]:
    proc = Proc(args)
    try:
        port = proc.wait_for(LISTENING.pattern, timeout=60).group(1)
    except NotPrinted as exc:
        proc.stop()
        raise ConformanceError(f"the {name} did not start:\n{proc.tail()}") from exc
    return proc, f"http://127.0.0.1:{port}"


def deprecated_models() -> list[str]:
    """The models the installed Anthropic SDK warns are deprecated: its suite sends each one
    and expects the warning and a reply, and the list changes with the SDK's version."""
    try:
        from anthropic.resources.messages import DEPRECATED_MODELS
    except ImportError:  # an SDK without the list sends none of them
        return []
    return sorted(DEPRECATED_MODELS)


def policy_text(emu_url: str, work: Path) -> str:
    """``conformance/policy.yaml`` for this run: its emulator, its scratch folder, and the
    SDK's deprecated models served like the others."""
    text = (HERE / "policy.yaml").read_text().replace("{emu}", emu_url).replace("{dir}", str(work))
    data = yaml.safe_load(text)
    for name in deprecated_models():
        data["models"].setdefault(name, {"provider": "anthropic"})
    return yaml.safe_dump(data, sort_keys=False)


@contextmanager
def servers(work: Path, logs: Path) -> Iterator[dict[str, str]]:
    """An emulator and a gateway in front of it (``conformance/policy.yaml``): target -> URL.
    Their output goes to ``logs`` when they stop (a regression's first clue may be there)."""
    logs.mkdir(parents=True, exist_ok=True)
    emulator, emu_url = _start([*TOLLWAY, "emulator", "--port", "0"], "emulator")
    gateway: Proc | None = None
    try:
        policy = work / "policy.yaml"
        policy.write_text(policy_text(emu_url, work))
        gateway, gw_url = _start([*TOLLWAY, "serve", "--policy", str(policy)], "gateway")
        yield {"gateway": gw_url, "emulator": emu_url}
    finally:
        if gateway is not None:
            gateway.stop()
            (logs / "gateway.log").write_text(gateway.text())
        emulator.stop()
        (logs / "emulator.log").write_text(emulator.text())


def expected_path(sdk: str) -> Path:
    return HERE / f"expected-{sdk}.txt"


def _header(sdk: str, version: str, suite: Suite) -> list[str]:
    return [
        f"# {sdk} {version}: the SDK's own tests run through the gateway (conformance/suites.py:",
        "# " + ", ".join(f.removeprefix("tests/api_resources/") for f in suite.files) + ").",
        "# PASS id, or FAIL id  # why. A PASS that fails fails CI; a FAIL that passes is reported.",
        "# Rewrite with `python -m conformance.run --update` (reasons are kept; new ones need one).",
    ]


def _listed_version(header: list[str], sdk: str) -> str | None:
    for line in header:
        words = line.lstrip("# ").split()
        if len(words) >= 2 and words[0] == sdk:
            return words[1].rstrip(":")
    return None


def _show(
    title: str,
    ids: list[str],
    results: dict[str, dict[str, str]] | None = None,
    limit: int | None = None,
) -> None:
    """Print a titled list of test ids (with each one's error), the first ``limit`` only."""
    if not ids:
        return
    print(f"  {title} ({len(ids)}):")
    for test_id in ids[:limit]:
        why = (results or {}).get(test_id, {}).get("message", "")
        print(f"    {test_id}" + (f"  -- {why}" if why else ""))
    if limit is not None and len(ids) > limit:
        print(f"    ... {len(ids) - limit} more: see the logs")


def check(sdk: str, version: str, suite: Suite, runs: dict[str, Outcomes], update: bool) -> bool:
    """Print the counts and the comparison of ``sdk``'s runs; whether it conforms."""
    total = len(next(iter(runs.values())).results)
    counts = ", ".join(
        f"{t}: {r.passed} of {len(r.results)} pass ({r.seconds:.0f} s)" for t, r in runs.items()
    )
    print(f"{sdk} {version}: {counts}")
    if "gateway" in runs and "emulator" in runs:
        gw, emu = runs["gateway"].outcomes(), runs["emulator"].outcomes()
        only_emu = sorted(t for t in gw if emu.get(t) == exp.PASSED and gw[t] != exp.PASSED)
        only_gw = sorted(t for t in gw if gw[t] == exp.PASSED and emu.get(t) != exp.PASSED)
        _show(
            "pass against the emulator alone, not through the gateway",
            only_emu,
            runs["gateway"].results,
            limit=LIST_LIMIT,
        )
        _show(
            "pass through the gateway, not against the emulator alone",
            only_gw,
            runs["emulator"].results,
            limit=LIST_LIMIT,
        )
    if "gateway" not in runs:
        return True
    gateway = runs["gateway"]
    path = expected_path(sdk)
    listed = exp.load(path)
    if update:
        text = exp.render(_header(sdk, version, suite), gateway.outcomes(), listed.reasons)
        path.write_text(text)
        print(
            f"  wrote {path.relative_to(ROOT)} ({gateway.passed} PASS, {total - gateway.passed} FAIL)"
        )
        return True
    was = _listed_version(listed.header, sdk)
    if was is not None and was != version:
        print(f"  note: {path.name} lists {sdk} {was}; {version} is installed (run --update)")
    expected_passes = sum(1 for s in listed.status.values() if s == "PASS")
    print(
        f"  expected through the gateway: {expected_passes} of {len(listed.status)} ({path.name})"
    )
    result = exp.compare(listed, gateway.outcomes())
    _show("REGRESSIONS: listed PASS, not passing now", result.regressions, gateway.results)
    _show("newly passing: update the list", result.newly_passing)
    _show("not in the list", result.unknown, gateway.results, limit=LIST_LIMIT)
    _show("in the list, did not run", result.missing, limit=LIST_LIMIT)
    return result.ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m conformance.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--sdk", choices=sorted(SUITES), action="append", help="default: both")
    parser.add_argument("--target", choices=(*TARGETS, "both"), default="both")
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="sdists and extracted tests"
    )
    parser.add_argument(
        "--update", action="store_true", help="rewrite expected-<sdk>.txt from the gateway run"
    )
    args = parser.parse_args(argv)
    sdks = args.sdk or sorted(SUITES)
    targets = TARGETS if args.target == "both" else (args.target,)
    cache = args.cache.resolve()
    try:
        ensure_dependencies()
        prepared = {sdk: prepare(SUITES[sdk], cache) for sdk in sdks}
    except FetchError as exc:
        if os.environ.get("CI") == "true":
            print(f"CONFORMANCE FAILED: {exc}", file=sys.stderr)
            return 1
        print(f"CONFORMANCE SKIPPED (no network?): {exc}", file=sys.stderr)
        return 0
    ok, totals = True, []
    logs = cache / "logs"
    try:
        with (
            tempfile.TemporaryDirectory(prefix="tollway-conformance-") as tmp,
            servers(Path(tmp), logs) as urls,
        ):
            for sdk in sdks:
                version, root = prepared[sdk]
                suite = SUITES[sdk]
                runs = {t: run_suite(sdk, suite, root, urls[t], t, logs) for t in targets}
                ok = check(sdk, version, suite, runs, args.update) and ok
                totals += [f"{sdk} {t} {r.passed}/{len(r.results)}" for t, r in runs.items()]
    except ConformanceError as exc:
        print(f"CONFORMANCE FAILED: {exc}", file=sys.stderr)
        return 1
    verdict = "as expected" if ok else "REGRESSED"
    print(f"conformance {verdict}: {', '.join(totals)} pass (logs in {logs})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
