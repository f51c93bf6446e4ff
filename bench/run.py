"""Tollway's overhead benchmark: direct vs a bare aiohttp proxy vs the gateway, on loopback.

    python bench/run.py [--quick] [--check]
    python bench/run.py --state      # Redis state, instances, workers: bench/instances.py

Why three targets: "direct" (client -> emulator) is the floor of the machine, "bare"
(client -> bench/bare_proxy.py -> emulator) is the floor of *any* Python proxy, and "gateway"
(client -> tollway serve -> emulator) is the product. The gateway's cost is judged against both:
latency and TTFB overheads against direct (what a user feels), throughput against bare (what
the features cost on top of an unavoidable extra hop).

The gateway runs the shipped ``policies.yaml`` chain, whatever it contains; only what would
make the numbers meaningless is changed (``bench/policy.py``). wrk drives the non-streaming
runs; a small aiohttp client measures streaming time-to-first-byte, which wrk cannot see.
Writes bench/results.md and bench/results.json and prints the markdown.

This file is the entry point; the harness is in modules by phase: ``procs`` (the servers'
processes, shared with the tests), ``policy`` (the generated policy), ``servers`` (start-up),
``load`` (the request, wrk), ``procfs`` (CPU and memory), ``measure`` (the rounds),
``profiling`` (``--profile``) and ``report`` (results.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the harness is imported as the `bench` package
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench.endpoints import measure_endpoints  # noqa: E402
from bench.load import PINNED_WRK, unique_body, wrk_version  # noqa: E402
from bench.measure import FULL, QUICK, Settings, chain_costs, measure, measure_writer  # noqa: E402
from bench.policy import chain_label, pick_tier  # noqa: E402
from bench.procfs import CpuSnapshot, machine  # noqa: E402
from bench.procs import BenchError, Processes  # noqa: E402
from bench.profiling import profile_gateway, render_profile  # noqa: E402
from bench.report import evaluate, git_revision, notes, render  # noqa: E402
from bench.servers import start_servers  # noqa: E402

BENCH = ROOT / "bench"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM behaves like Ctrl-C, so the ``finally`` that stops the servers always runs."""
    raise KeyboardInterrupt


def run(settings: Settings, quick: bool, opts: argparse.Namespace) -> dict[str, Any]:
    """Start the servers, measure, stop them whatever happens; then the writer measurement."""
    run_notes: list[str] = []
    wrk = wrk_version()
    if PINNED_WRK not in wrk:
        run_notes.append(f"wrk is {wrk}, not the pinned {PINNED_WRK}: numbers may not compare")
        print(f"warning: {run_notes[-1]}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="tollway-bench-") as tmp_name:
        procs = Processes()
        try:
            report = _run(settings, quick, opts, Path(tmp_name), procs, run_notes, wrk)
        except BenchError:
            for name in procs.procs:
                print(f"--- {name} log ---\n{procs.tail(name)}", file=sys.stderr)
            raise
        finally:
            procs.stop_all()
    if settings.writer_rows:  # alone on the machine: every server is stopped by now
        print(f"metering writer, {settings.writer_rows:,} rows ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        report["writer"] = measure_writer(settings.writer_rows)
        report["phases_s"]["writer"] = round(time.monotonic() - t0, 1)
    return report


def _run(
    settings: Settings,
    quick: bool,
    opts: argparse.Namespace,
    tmp: Path,
    procs: Processes,
    run_notes: list[str],
    wrk: str,
) -> dict[str, Any]:
    t_start = time.monotonic()
    fleet = start_servers(procs, tmp, opts.policy, opts.prefix, opts.chains)
    print(
        f"measuring direct, bare and gateway ({chain_label(fleet.chain)})"
        + (f" + {len(fleet.prefixes)} chain prefixes at c=32" if fleet.prefixes else "")
        + " in alternating rounds ...",
        file=sys.stderr,
    )
    load0 = CpuSnapshot.take(fleet.pids)
    phases: dict[str, float] = {"start-up": round(time.monotonic() - t_start, 1)}
    results = measure(
        [fleet.direct, fleet.bare, fleet.gateway],
        fleet.prefixes,
        fleet.direct.base,
        fleet.emulator_pid,
        fleet.key,
        fleet.lua,
        settings,
        phases,
    )
    background = CpuSnapshot.take(fleet.pids).background_since(load0)
    procs.check_alive()
    endpoints = None
    if opts.endpoints:  # /v1/responses (native and translated) next to chat, same gateway
        t0 = time.monotonic()
        endpoints = measure_endpoints(
            fleet.gateway, fleet.direct.base, fleet.emulator_pid, fleet.key, tmp, settings
        )
        phases["responses vs chat"] = round(time.monotonic() - t0, 1)
        procs.check_alive()
    profile = profile_gateway(fleet.gateway, fleet.lua, opts.profile, tmp) if opts.profile else None
    if profile is not None and opts.profile_raw:
        shutil.copy(tmp / "profile.raw", opts.profile_raw)
    chains = chain_costs(results, fleet.steps)

    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": quick,
        "machine": machine(),
        "versions": {
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "uvloop": version("uvloop"),
            "wrk": wrk,
            # what the gateway's idle memory mostly depends on (DuckDB alone is ~60 MB of it)
            **{name: version(name) for name in ("duckdb", "cryptography", "pydantic")},
        },
        "revision": git_revision(),
        "chain": fleet.chain,
        "tier": pick_tier(fleet.policy),
        "policy_changes": fleet.changes,
        "body_bytes": len(json.dumps(unique_body("0123abcd-1-1000"), separators=(",", ":"))),
        "settings": {
            "latency_s": settings.latency_s,
            "throughput_s": settings.throughput_s,
            "warmup_s": settings.warmup_s,
            "ttfb_requests": settings.ttfb_requests,
            "rounds": settings.rounds,
            "throughput_rounds": settings.throughput_rounds,
            "writer_rows": settings.writer_rows,
        },
        "memory_idle": fleet.idle,
        "background": background,
        "targets": {n: results[n] for n in ("direct", "bare", "gateway")},
        "chain_targets": {t.name: results[t.name] for t in fleet.prefixes},
        "chains": chains,
        "endpoints": endpoints,
        "profile": profile,
        "phases_s": phases,
        "notes": run_notes + notes(results, chains, background),
    }
    report["checks"] = evaluate(report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tollway overhead benchmark (loopback only)")
    parser.add_argument("--quick", action="store_true", help="short runs (~1 min), less precise")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target fails")
    parser.add_argument("--policy", type=Path, default=ROOT / "policies.yaml")
    parser.add_argument(
        "--no-chains",
        dest="chains",
        action="store_false",
        help="skip the per-plugin cost (gateways running prefixes of the chain)",
    )
    parser.add_argument(
        "--no-writer", action="store_true", help="skip the metering writer measurement"
    )
    parser.add_argument(
        "--no-responses",
        dest="endpoints",
        action="store_false",
        help="skip /v1/responses (passed through and translated) next to chat completions",
    )
    parser.add_argument(
        "--prefix",
        type=int,
        metavar="N",
        help="measure only the first N plugins of the policy's chain (e.g. 2: auth, limits)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=BENCH / "results.md",
        help="where the report goes (and its JSON beside it, .json)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="SECONDS",
        help="after measuring, py-spy the full gateway under c=32 load for SECONDS "
        "and write bench/profile.md",
    )
    parser.add_argument(
        "--state",
        action="store_true",
        help="instead: memory vs Redis state, 1 vs 3 instances, --workers 1 vs 2 "
        "(bench/instances.py; writes bench/results-instances.md)",
    )
    parser.add_argument(
        "--profile-raw",
        type=Path,
        metavar="FILE",
        help="with --profile, also keep py-spy's raw collapsed stacks in FILE",
    )
    args = parser.parse_args(argv)
    if args.state:
        from bench.instances import main as instances

        forward = ["--policy", str(args.policy), "--profile", str(args.profile)]
        forward += ["--quick"] * args.quick + ["--check"] * args.check
        if args.out != parser.get_default("out"):
            forward += ["--out", str(args.out)]
        return instances(forward)
    settings = QUICK if args.quick else FULL
    if args.no_writer:
        settings = dataclasses.replace(settings, writer_rows=0)
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    try:
        report = run(settings, args.quick, args)
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 2
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    markdown = render(report)
    args.out.write_text(markdown)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    if report.get("profile"):
        (BENCH / "profile.md").write_text(render_profile(report["profile"], report))
    print(markdown)
    failed = [c for c in report["checks"] if not c["pass"]]
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
