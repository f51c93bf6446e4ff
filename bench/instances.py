"""Redis state and several processes: what sharing state costs one gateway, and what more
gateway processes buy on this machine.

    .venv/bin/python bench/run.py --state      # ~2.5 min; bench/results-instances.md (+ .json)
    .venv/bin/python bench/instances.py [--quick] [--profile SECONDS]

Three comparisons, each an A/B pair measured in alternating rounds (A B, B A, A B, ...), so a
noisy neighbour or slow drift hits both sides alike; every round is one wrk run:

1. **state**: the bench policy (``bench/policy.py``) with ``state.url: memory://`` against the
   same policy with ``state.url: redis://`` (limits, quotas and keys on Redis; everything else
   as shipped), one ``tollway serve`` each: gateway CPU per request, redis-server CPU per
   request, req/s at c=32 and p50 at c=1.
2. **instances**: one against three ``tollway serve`` on one Redis, as a multi-instance
   deployment runs them (``metering.sink: redis``, one ``tollway meter`` loading the stream).
   One wrk drives both sides with the same three threads and connections; its ``setup()`` hook
   points each thread at one instance (``thread.addr``), so with three instances each gets a
   third of the connections, as an L4 balancer spreading connections would, without adding a
   hop (a Python round-robin proxy would be the bottleneck it measures). With one instance
   all three threads connect to it.
3. **workers**: ``tollway serve --workers 1`` against ``--workers 2`` (same policy as 2): one
   port, the kernel spreads connections over the workers (``SO_REUSEPORT``).

Then ``bench/redis_client.py`` times one admission alone in each Redis client (redis-py with
either parser, ``proxy.resp``), which says how much of the state comparison is the client.
The servers are started by ``bench/fleet.py``; ``bench/instances_report.py`` writes the report.

Only requests wrk counted as answered are counted. CPU is ``/proc`` utime + stime of every
process of a side (all workers, all instances), read after the side is idle again; the
redis-server, ``tollway meter`` and emulator CPU is reported beside it. On a 2-core machine
wrk, the emulator, redis-server and the gateways share the cores: req/s of more processes is
a capacity figure of *this* machine, which the report states with the cores each part used.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the harness is imported as the `bench` package
    sys.path.insert(0, str(ROOT))

from bench.fleet import (  # noqa: E402
    SCALE_CONNS,
    SCALE_THREADS,
    Fleet,
    Side,
    redis_version,
    sanity,
    start_fleet,
)
from bench.load import CHAT, run_wrk  # noqa: E402
from bench.measure import Target, usage_rows  # noqa: E402
from bench.policy import pick_tier  # noqa: E402
from bench.procfs import CpuSnapshot, cpu_seconds, machine, settle  # noqa: E402
from bench.procs import BenchError, Processes  # noqa: E402
from bench.redis_client import measure_clients  # noqa: E402
from bench.report import git_revision  # noqa: E402

BENCH = ROOT / "bench"


@dataclass(frozen=True, slots=True)
class Settings:
    """Rounds per comparison and seconds per wrk run (each side runs once per round)."""

    state_rounds: int
    state_s: int
    latency_s: int  # c=1 runs of the state comparison, per side per round
    scale_rounds: int  # instances and workers
    scale_s: int
    client_rounds: int  # bench/redis_client.py


FULL = Settings(state_rounds=8, state_s=3, latency_s=1, scale_rounds=6, scale_s=3, client_rounds=3)
QUICK = Settings(state_rounds=3, state_s=2, latency_s=1, scale_rounds=3, scale_s=2, client_rounds=1)


# ---- rounds -------------------------------------------------------------------------------------


def load_round(side: Side, threads: int, conns: int, seconds: int) -> dict[str, Any]:
    """One wrk run against ``side`` with the CPU every process of the run spent meanwhile
    (the gateways' read once they are idle again, after their usage rows were loaded)."""
    gateways = side.gateway_pids()
    rows0 = sum(usage_rows(t) for t in side.usage)
    cpu0 = {"gateway": sum(cpu_seconds(p) for p in gateways)}
    cpu0 |= {role: cpu_seconds(pid) for role, pid in side.roles.items()}
    t0 = time.monotonic()
    result = run_wrk(side.url, side.lua, threads, conns, seconds)
    result["wall_s"] = time.monotonic() - t0
    if side.usage:
        result["usage_rows"] = sum(usage_rows(t) for t in side.usage) - rows0
    for pid in gateways:
        settle(pid)
    result["cpu_s"] = {"gateway": sum(cpu_seconds(p) for p in gateways) - cpu0["gateway"]}
    result["cpu_s"] |= {role: cpu_seconds(pid) - cpu0[role] for role, pid in side.roles.items()}
    result["processes"] = len(gateways)
    return result


def alternate(
    pair: tuple[Side, Side], rounds: int, run: Callable[[Side], Any]
) -> dict[str, list[Any]]:
    """``rounds`` rounds of one ``run`` per side, the order alternating (A B, B A, ...)."""
    a, b = pair
    out: dict[str, list[Any]] = {a.name: [], b.name: []}
    for k in range(rounds):
        for side in (a, b) if k % 2 == 0 else (b, a):
            out[side.name].append(run(side))
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's rounds: req/s over all rounds, CPU µs per request (all rounds pooled, the
    median round and the best) and cores used, per process role."""
    requests = sum(r["requests"] for r in runs)
    duration = sum(r["duration_us"] for r in runs) / 1e6
    wall = sum(r["wall_s"] for r in runs)
    out: dict[str, Any] = {
        "requests": requests,
        "rps": requests / duration,
        "rps_rounds": [r["rps"] for r in runs],
        "latency_p50_ms": statistics.median(r["latency_us"]["p50"] for r in runs) / 1000,
        "latency_p99_ms": statistics.median(r["latency_us"]["p99"] for r in runs) / 1000,
        "processes": runs[0]["processes"],
        "errors": {k: sum(r["errors"][k] for r in runs) for k in runs[0]["errors"]},
    }
    for role in runs[0]["cpu_s"]:
        per_round = [r["cpu_s"][role] / r["requests"] * 1e6 for r in runs]
        out[role] = {
            "cpu_us_per_request": sum(r["cpu_s"][role] for r in runs) / requests * 1e6,
            "cpu_us_median_round": statistics.median(per_round),
            "cpu_us_best_round": min(per_round),
            "cpu_us_rounds": per_round,
            "cores": sum(r["cpu_s"][role] for r in runs) / wall,
        }
    if "usage_rows" in runs[0]:
        out["usage_rows"] = sum(r["usage_rows"] for r in runs)
        # wrk does not count the requests in flight when it stops; the gateway records them
        out["usage_rows_extra"] = out["usage_rows"] - requests
        out["usage_rows_extra_max"] = 32 * len(runs)
    return out


def paired(a: list[dict[str, Any]], b: list[dict[str, Any]], get: Callable[[Any], float]) -> Any:
    """B / A per round (the two runs of a round are seconds apart): median and range."""
    ratios = [get(y) / get(x) for x, y in zip(a, b, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def pair_report(pair: tuple[Side, Side], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Both sides summarized, and B/A ratios of req/s and gateway CPU per request."""
    a, b = pair[0].name, pair[1].name
    return {
        "a": a,
        "b": b,
        a: summarize(runs[a]),
        b: summarize(runs[b]),
        "rps_ratio": paired(runs[a], runs[b], lambda r: r["rps"]),
        "gateway_cpu_ratio": paired(
            runs[a], runs[b], lambda r: r["cpu_s"]["gateway"] / r["requests"]
        ),
        "rounds": runs,
    }


def measure(fleet: Fleet, settings: Settings, phases: dict[str, float]) -> dict[str, Any]:
    """Warm-up, then the three comparisons one after the other (their rounds alternate)."""
    t0 = time.monotonic()

    def lap(name: str) -> None:
        nonlocal t0
        phases[name] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()

    for side in fleet.sides:  # it answers; warm pools, caches and the allocator
        sanity(side.url.removesuffix(CHAT), fleet.key)
        run_wrk(side.url, side.lua, 2, 32, 2)
    lap("warm-up")

    print("  memory vs redis state ...", file=sys.stderr, flush=True)
    latency = alternate(
        fleet.state,
        settings.state_rounds,
        lambda side: run_wrk(side.url, side.lua, 1, 1, settings.latency_s),
    )
    state = pair_report(
        fleet.state,
        alternate(
            fleet.state,
            settings.state_rounds,
            lambda side: load_round(side, 2, 32, settings.state_s),
        ),
    )
    for name, runs in latency.items():
        state[name]["latency_c1_p50_ms"] = (
            statistics.median(r["latency_us"]["p50"] for r in runs) / 1000
        )
    lap("state")

    print("  1 vs 3 instances ...", file=sys.stderr, flush=True)
    instances = pair_report(
        fleet.instances,
        alternate(
            fleet.instances,
            settings.scale_rounds,
            lambda side: load_round(side, SCALE_THREADS, SCALE_CONNS, settings.scale_s),
        ),
    )
    lap("instances")
    print("  --workers 1 vs 2 ...", file=sys.stderr, flush=True)
    workers = pair_report(
        fleet.workers,
        alternate(
            fleet.workers,
            settings.scale_rounds,
            lambda side: load_round(side, 2, 32, settings.scale_s),
        ),
    )
    lap("workers")
    return {"state": state, "instances": instances, "workers": workers}


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def run(
    settings: Settings, opts: argparse.Namespace, tmp: Path, procs: Processes
) -> dict[str, Any]:
    """Start every server, measure, and (``--profile``) py-spy the Redis-state gateway."""
    started = time.monotonic()
    fleet = start_fleet(procs, tmp, opts.policy)
    phases = {"start-up": round(time.monotonic() - started, 1)}
    load0 = CpuSnapshot.take(fleet.pids)
    results = measure(fleet, settings, phases)
    print("  one admission per Redis client ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    redis_db2 = f"redis://127.0.0.1:{fleet.redis_port}/2"
    results["clients"] = measure_clients(redis_db2, fleet.roles["redis"], settings.client_rounds)
    phases["clients"] = round(time.monotonic() - t0, 1)
    procs.check_alive()
    background = CpuSnapshot.take(fleet.pids).background_since(load0)
    profile = None
    if opts.profile:
        from bench.profiling import profile_gateway

        red = fleet.state[1]
        target = Target(red.name, red.url.removesuffix(CHAT), red.gateway_pids()[0])
        profile = profile_gateway(target, red.lua, opts.profile, tmp)
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": opts.quick,
        "machine": machine(),
        "versions": {
            "python": platform.python_version(),
            **{n: _version(n) for n in ("aiohttp", "uvloop", "redis", "hiredis")},
            "redis-server": redis_version(fleet.redis_port),
        },
        "revision": git_revision(),
        "chain": fleet.chain,
        "tier": pick_tier(fleet.policy),
        "policy_changes": fleet.changes,
        "settings": {
            "state_rounds": settings.state_rounds,
            "state_s": settings.state_s,
            "latency_s": settings.latency_s,
            "scale_rounds": settings.scale_rounds,
            "scale_s": settings.scale_s,
            "scale_threads": SCALE_THREADS,
            "scale_conns": SCALE_CONNS,
        },
        **results,
        "profile": profile,
        "background": background,
        "phases_s": phases,
    }


def main(argv: list[str] | None = None) -> int:
    from bench.instances_report import evaluate, render

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (~1 min)")
    parser.add_argument("--policy", type=Path, default=ROOT / "policies.yaml")
    parser.add_argument(
        "--out", type=Path, default=BENCH / "results-instances.md", help="(and .json beside it)"
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="SECONDS",
        help="afterwards, py-spy the Redis-state gateway under c=32 load (in the report)",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a target fails")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tollway-instances-") as tmp_name:
        procs = Processes()
        try:
            report = run(settings, args, Path(tmp_name), procs)
        except KeyboardInterrupt:
            print("interrupted; servers stopped", file=sys.stderr)
            return 130
        except BenchError as e:
            for name in procs.procs:
                print(f"--- {name} log ---\n{procs.tail(name)}", file=sys.stderr)
            print(f"benchmark failed: {e}", file=sys.stderr)
            return 2
        finally:
            procs.stop_all()
    report["elapsed_s"] = round(time.monotonic() - began, 1)
    report["checks"] = evaluate(report)
    markdown = render(report)
    args.out.write_text(markdown)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown)
    failed = [c for c in report["checks"] if not c["pass"]]
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
