"""The measurements: c=1 latency, streaming TTFB and c=32 throughput in alternating rounds,
CPU per request per chain prefix, and the metering writer.

Each phase is split into rounds that alternate the targets, so a noisy neighbour or slow drift
hits all targets alike rather than whichever ran at that moment. wrk only reports percentiles,
so a target's percentiles are the median of its rounds'.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import subprocess
import sys
import time
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.load import (
    CHAT,
    STREAM_CHUNK_DELAY_MS,
    STREAM_WORDS,
    http,
    run_wrk,
    unique_body,
)
from bench.procfs import cpu_seconds, memory_mb, settle
from bench.procs import ROOT, BenchError


@dataclass(frozen=True, slots=True)
class Settings:
    """How long each phase runs; --quick trades precision for a ~1 minute run."""

    latency_s: int
    throughput_s: int
    warmup_s: int
    ttfb_requests: int
    ttfb_warmup: int
    rounds: int  # each phase is split into this many rounds that alternate the targets
    throughput_rounds: int  # c=32: more, shorter rounds pair the chain prefixes more tightly
    writer_rows: int  # rows for the metering writer measurement (bench/writer.py)


FULL = Settings(
    latency_s=10,
    throughput_s=10,
    warmup_s=2,
    ttfb_requests=300,
    ttfb_warmup=30,
    rounds=5,
    throughput_rounds=10,
    writer_rows=200_000,
)
QUICK = Settings(
    latency_s=3,
    throughput_s=3,
    warmup_s=1,
    ttfb_requests=99,
    ttfb_warmup=10,
    rounds=3,
    throughput_rounds=3,
    writer_rows=50_000,
)


@dataclass(slots=True)
class Target:
    """A URL to load and the server process (if any) whose CPU and memory are tracked."""

    name: str
    base: str
    pid: int | None
    admin_key: str | None = None  # set for a gateway whose chain has a usage database
    path: str = CHAT  # what is loaded: chat completions, unless another endpoint is measured

    @property
    def url(self) -> str:
        return self.base + self.path


def rotated(targets: list[Target], k: int) -> list[Target]:
    """Round k starts at a different target, so no target always runs first or last."""
    k %= len(targets)
    return targets[k:] + targets[:k]


# ---- statistics ----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation, like wrk's histogram)."""
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(samples: list[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(samples, 50),
        "p90_ms": percentile(samples, 90),
        "p99_ms": percentile(samples, 99),
        "mean_ms": sum(samples) / len(samples),
    }


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge one target's wrk rounds: counts add up, percentiles are the median of the rounds'.

    wrk only reports percentiles, not its histogram, so rounds cannot be merged exactly; the
    median of rounds also shrugs off one round spoilt by a noisy neighbour.
    """
    requests = sum(r["requests"] for r in runs)
    duration = sum(r["duration_us"] for r in runs)
    out: dict[str, Any] = {
        "requests": requests,
        "duration_us": duration,
        "rps": requests / (duration / 1e6),
        "errors": {k: sum(r["errors"][k] for r in runs) for k in runs[0]["errors"]},
        "latency_us": {
            q: statistics.median(r["latency_us"][q] for r in runs) for q in runs[0]["latency_us"]
        },
        "rounds": runs,
    }
    wall = sum(r["wall_s"] for r in runs if "wall_s" in r)
    for who in ("proxy", "emulator", "proxy_main"):
        cpu = [r[f"{who}_cpu_s"] for r in runs if f"{who}_cpu_s" in r]
        if cpu:
            out[f"{who}_cores"] = sum(cpu) / wall
            out[f"{who}_cpu_us_per_request"] = sum(cpu) / requests * 1e6
    upstream = [r["upstream_requests"] for r in runs if "upstream_requests" in r]
    if upstream:
        # 1.0 unless the chain answers some requests itself (a cache); in-flight requests
        # at the end of each wrk run reach the emulator without being counted by wrk.
        out["upstream_per_request"] = sum(upstream) / requests
    return out


# ---- counters the servers keep ------------------------------------------------------------


def emulator_requests(emu: str) -> int:
    return int(http("GET", f"{emu}/_emulator/stats")["requests"])


def usage_rows(target: Target) -> int:
    """Requests in the gateway's usage table, through ``/admin/sql``, which first loads every
    row still in the spool: the metering writer's deferred work is done when this returns."""
    reply = http(
        "POST",
        f"{target.base}/admin/sql",
        {"query": "SELECT count(*) FROM usage"},
        {"Authorization": f"Bearer {target.admin_key}"},
    )
    return int(reply["rows"][0][0])


def has_usage_db(base: str, admin_key: str) -> bool:
    """Whether the gateway's chain keeps a usage database (``/admin/sql`` answers 404 if not)."""
    try:
        usage_rows(Target("probe", base, None, admin_key))
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        raise
    return True


# ---- streaming TTFB --------------------------------------------------------------------------


async def _ttfb(targets: list[Target], key: str, settings: Settings) -> dict[str, Any]:
    """Sequential streamed requests, one keep-alive connection per target, in interleaved
    rounds; returns ms from sending a request to its first body chunk, per target."""
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "x-emulator-words": str(STREAM_WORDS),
        "x-emulator-chunk-delay-ms": str(STREAM_CHUNK_DELAY_MS),
    }
    nonce = secrets.token_hex(4)
    sent = 0
    samples: dict[str, list[float]] = {t.name: [] for t in targets}
    events: dict[str, int] = {}

    async def one(session: aiohttp.ClientSession, target: Target) -> float:
        nonlocal sent
        sent += 1
        body = unique_body(f"stream-{nonce}-{sent}", stream=True, max_tokens=64)
        payload = json.dumps(body).encode()
        t0 = time.perf_counter()
        async with session.post(target.url, data=payload, headers=headers) as resp:
            first = await resp.content.readany()
            t1 = time.perf_counter()
            got = first + await resp.read()
        if resp.status != 200 or not first or not got.rstrip().endswith(b"[DONE]"):
            raise BenchError(f"{target.name}: bad stream (HTTP {resp.status}): {got[:300]!r}")
        events[target.name] = got.count(b"\n\n")
        return (t1 - t0) * 1000

    sessions = {
        t.name: aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1), auto_decompress=False
        )
        for t in targets
    }
    try:
        for t in targets:
            for _ in range(settings.ttfb_warmup):
                await one(sessions[t.name], t)
        per_round = max(1, settings.ttfb_requests // settings.rounds)
        for k in range(settings.rounds):
            for t in rotated(targets, k):
                for _ in range(per_round):
                    samples[t.name].append(await one(sessions[t.name], t))
    finally:
        for session in sessions.values():
            await session.close()
    return {
        n: {"requests": len(s), "events": events[n], **summarize(s)} for n, s in samples.items()
    }


def measure_ttfb(targets: list[Target], key: str, settings: Settings) -> dict[str, Any]:
    """Run the TTFB client on uvloop (as the servers do) so client noise stays small."""
    coro = _ttfb(targets, key, settings)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# ---- rounds ----------------------------------------------------------------------------------


def throughput_round(
    target: Target, emu: str, emu_pid: int, lua: Path, seconds: int
) -> dict[str, Any]:
    """One c=32 wrk run with the CPU the proxy and the emulator spent during it.

    The proxy's CPU is read once it has settled, after a gateway with a usage database loaded
    every row of the round (so the writer's background load is part of the round's cost).
    """
    pids = {"emulator": emu_pid} | ({"proxy": target.pid} if target.pid else {})
    upstream0 = emulator_requests(emu)
    rows0 = usage_rows(target) if target.admin_key else 0
    cpu0 = {n: cpu_seconds(p) for n, p in pids.items()}
    main0 = cpu_seconds(target.pid, main_thread=True) if target.pid else 0.0
    t0 = time.monotonic()
    result = run_wrk(target.url, lua, 2, 32, seconds)
    result["wall_s"] = time.monotonic() - t0
    if target.admin_key:
        result["usage_rows"] = usage_rows(target) - rows0
    if target.pid:
        settle(target.pid)
    for n, p in pids.items():
        result[f"{n}_cpu_s"] = cpu_seconds(p) - cpu0[n]
    if target.pid:
        result["proxy_main_cpu_s"] = cpu_seconds(target.pid, main_thread=True) - main0
    result["upstream_requests"] = emulator_requests(emu) - upstream0
    return result


def warm_up(t: Target, key: str, lua: Path, seconds: int) -> dict[str, str]:
    """A sanity request (returns its reply headers), then ``seconds`` of c=32 load."""
    headers: dict[str, str] = {}
    body = unique_body(f"sanity-{secrets.token_hex(4)}")
    reply = http("POST", t.url, body, {"Authorization": f"Bearer {key}"}, headers)
    if not reply.get("choices"):
        raise BenchError(f"{t.name}: unexpected reply {reply}")
    run_wrk(t.url, lua, 2, 32, seconds)  # warm pools, caches and the allocator
    return headers


def measure(
    targets: list[Target],
    chains: list[Target],
    emu: str,
    emu_pid: int,
    key: str,
    lua: Path,
    settings: Settings,
    phases: dict[str, float],
) -> dict[str, dict[str, Any]]:
    """Sanity and warm-up, then c=1 latency, TTFB and c=32 throughput, each phase in rounds
    that alternate the targets, so slow drift or a noisy neighbour hits all of them alike.

    ``chains`` (gateways running a prefix of the chain) only take part in the c=32 rounds,
    alternating with the others, for the per-plugin CPU cost.
    """
    t0 = time.monotonic()

    def lap(name: str) -> None:
        nonlocal t0
        phases[name] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()

    out: dict[str, dict[str, Any]] = {t.name: {} for t in [*targets, *chains]}
    for t in [*targets, *chains]:  # the prefixes run only at c=32: a shorter warm-up will do
        headers = warm_up(t, key, lua, settings.warmup_s if t in targets else 1)
        out[t.name]["tollway_headers"] = {
            k: v for k, v in headers.items() if k.startswith("x-tollway-")
        }

    lap("warm-up")
    print("  latency at c=1 ...", file=sys.stderr, flush=True)
    seconds = max(1, round(settings.latency_s / settings.rounds))
    latency: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for k in range(settings.rounds):
        for t in rotated(targets, k):
            latency[t.name].append(run_wrk(t.url, lua, 1, 1, seconds))

    lap("latency c=1")
    print("  streaming TTFB ...", file=sys.stderr, flush=True)
    ttfb = measure_ttfb(targets, key, settings)
    lap("TTFB")

    both = [*targets[:-1], *chains, targets[-1]]  # direct, bare, the prefixes, the full chain
    print(f"  throughput at c=32 ({len(both)} targets) ...", file=sys.stderr, flush=True)
    seconds = max(1, round(settings.throughput_s / settings.throughput_rounds))
    throughput: dict[str, list[dict[str, Any]]] = {t.name: [] for t in both}
    for k in range(settings.throughput_rounds):
        for t in rotated(both, k):
            throughput[t.name].append(throughput_round(t, emu, emu_pid, lua, seconds))
    lap("throughput c=32")

    for t in targets:
        out[t.name]["latency_c1"] = combine(latency[t.name])
        out[t.name]["ttfb"] = ttfb[t.name]
    for t in both:
        out[t.name]["throughput_c32"] = combine(throughput[t.name])
        if t.pid:
            out[t.name]["memory_after_load"] = memory_mb(t.pid)
    return out


def chain_costs(
    results: dict[str, dict[str, Any]], steps: list[tuple[str, str, list[str]]]
) -> list[dict[str, Any]]:
    """Per chain prefix: CPU µs/request, its increment over the previous step, throughput ratio.

    ``steps`` is [(target name, label, chain)], bare proxy first. Increments are also computed
    round by round (the targets of a round ran within seconds of each other); their median and
    range say how much of a small increment is noise.
    """
    bare = results["bare"]["throughput_c32"]
    out: list[dict[str, Any]] = []
    prev: dict[str, Any] | None = None
    for name, label, chain in steps:
        tp = results[name]["throughput_c32"]
        rounds = [r["proxy_cpu_s"] / r["requests"] * 1e6 for r in tp["rounds"]]
        main = [r["proxy_main_cpu_s"] / r["requests"] * 1e6 for r in tp["rounds"]]
        row: dict[str, Any] = {
            "target": name,
            "label": label,
            "chain": chain,
            # medians of the rounds: a round spoilt by a burst of other work does not count
            "cpu_us_per_request": statistics.median(rounds),
            "cpu_us_best_round": min(rounds),
            "main_thread_cpu_us_per_request": statistics.median(main),
            "other_threads_cpu_us_per_request": max(
                0.0, statistics.median(a - b for a, b in zip(rounds, main, strict=True))
            ),
            "cpu_us_per_request_all_rounds": tp["proxy_cpu_us_per_request"],
            "cpu_us_rounds": rounds,
            "rps": tp["rps"],
            "ratio_vs_bare": tp["rps"] / bare["rps"],
            "proxy_cores": tp["proxy_cores"],
            "latency_p50_ms": tp["latency_us"]["p50"] / 1000,
        }
        if "usage_rows" in tp["rounds"][0]:
            # wrk does not count the requests in flight when it stops (at most 32 per round),
            # but the gateway answers and records them
            rows = sum(r["usage_rows"] for r in tp["rounds"])
            row["usage_rows"] = rows
            row["usage_rows_extra"] = rows - tp["requests"]
            row["usage_rows_extra_max"] = 32 * len(tp["rounds"])
        if prev is not None:
            diffs = [a - b for a, b in zip(rounds, prev["cpu_us_rounds"], strict=True)]
            row["increment_us"] = statistics.median(diffs)
            row["increment_rounds_us"] = diffs
            row["increment_best_us"] = row["cpu_us_best_round"] - prev["cpu_us_best_round"]
            row["added"] = (
                "gateway core (empty chain) vs bare"
                if not chain
                else ", ".join(chain[len(prev["chain"]) :])
            )
        out.append(row)
        prev = row
    return out


def measure_writer(rows: int) -> dict[str, Any]:
    """bench/writer.py in its own process (DuckDB's threads and memory stay out of this one).

    A failure is reported in the results, not raised: the server measurements stand alone.
    """
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "writer.py"), "--rows", str(rows), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode not in (0, 2) or not lines:  # 2: measured, but the row count is wrong
        return {"error": f"bench/writer.py exited {proc.returncode}: {proc.stderr[-1500:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result
