"""Tollway's overhead benchmark: direct vs a bare aiohttp proxy vs the gateway, on loopback.

    python bench/run.py [--quick] [--check]

Why three targets: "direct" (client -> emulator) is the floor of the machine, "bare"
(client -> bench/bare_proxy.py -> emulator) is the floor of *any* Python proxy, and "gateway"
(client -> tollway serve -> emulator) is the product. The gateway's cost is judged against both:
latency and TTFB overheads against direct (what a user feels), throughput against bare (what
the features cost on top of an unavoidable extra hop).

The gateway runs the shipped ``policies.yaml`` chain, whatever it contains; only what would
make the numbers meaningless is changed (see ``bench_policy``). wrk drives the non-streaming
runs; a small aiohttp client measures streaming time-to-first-byte, which wrk cannot see.
Writes bench/results.md and bench/results.json and prints the markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PINNED_WRK = "4.1.0"  # Debian's `wrk` package; other versions may report slightly differently
MODEL = "gpt-5.4-mini"
HUGE = 1_000_000_000  # "no limit" for the bench: far above anything a run can send
LISTENING = re.compile(r"listening on http://[^\s:]+:(\d+)")
CHAT = "/v1/chat/completions"
SMALL_BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Say hello to the benchmark"}],
    "max_tokens": 16,
}
STREAM_WORDS = 18  # + role, finish, usage and [DONE] events: a stream of ~20 events
STREAM_CHUNK_DELAY_MS = 1  # real pacing, so a buffering proxy could not hide behind one write
# No proxy handler: loopback traffic must never be sent through an http_proxy from the env.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True, slots=True)
class Settings:
    """How long each phase runs; --quick trades precision for a ~1 minute run."""

    latency_s: int
    throughput_s: int
    warmup_s: int
    ttfb_requests: int
    ttfb_warmup: int
    rounds: int  # each phase is split into this many rounds that alternate the targets


FULL = Settings(
    latency_s=10, throughput_s=10, warmup_s=2, ttfb_requests=300, ttfb_warmup=30, rounds=5
)
QUICK = Settings(
    latency_s=3, throughput_s=3, warmup_s=1, ttfb_requests=99, ttfb_warmup=10, rounds=3
)


class BenchError(Exception):
    """A run that cannot produce trustworthy numbers (a process died, requests failed)."""


# ---- processes -----------------------------------------------------------------------------


class Processes:
    """The servers under test; every one is stopped on exit, also on Ctrl-C or an error."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, TextIO] = {}

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, timeout: float = 30.0
    ) -> tuple[subprocess.Popen[bytes], int]:
        """Start ``argv`` and wait for its "listening on http://host:PORT" line; return PORT.

        Output goes to a file, not a pipe: a pipe nobody drains would block a chatty server.
        """
        path = self.logdir / f"{name}.log"
        log = path.open("w")
        self._logs[name] = log
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        self.procs[name] = proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = LISTENING.search(path.read_text())
            if m:
                return proc, int(m.group(1))
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        raise BenchError(f"{name} did not start:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.logdir / f"{name}.log"
        text = path.read_text() if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")

    def stop_all(self) -> None:
        """SIGTERM (graceful), then SIGKILL whatever is still running after 5 s."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs.values():
            log.close()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc/PID/stat (fields 14 and 15), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """Machine-wide and own CPU time, to tell how much *other* work shared the machine.

    A shared 2-core box makes throughput swing by tens of percent when something else runs;
    reporting the foreign load next to the numbers says whether a run can be trusted.
    """

    wall: float
    busy: float  # all CPUs, user+nice+system+irq+softirq, seconds
    steal: float  # time the hypervisor gave to other guests
    own: float  # the servers under test + finished children (wrk) + this process

    @classmethod
    def take(cls, pids: list[int]) -> CpuSnapshot:
        ticks = os.sysconf("SC_CLK_TCK")
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = resource.getrusage(resource.RUSAGE_SELF)
        own = sum(cpu_seconds(p) for p in pids) + children.ru_utime + children.ru_stime
        return cls(
            wall=time.monotonic(),
            busy=(user + nice + system + irq + softirq) / ticks,
            steal=steal / ticks,
            own=own + me.ru_utime + me.ru_stime,
        )

    def background_since(self, start: CpuSnapshot) -> dict[str, float]:
        wall = self.wall - start.wall
        other = (self.busy - start.busy) - (self.own - start.own)
        return {
            "wall_s": wall,
            "other_cores": max(0.0, other / wall),
            "steal_cores": (self.steal - start.steal) / wall,
        }


def memory_mb(pid: int) -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = int(value.split()[0]) / 1024
    return out


# ---- the generated policy ------------------------------------------------------------------


def _walk_secrets(node: Any, base: Path, env_names: set[str]) -> None:
    """Collect ``$env`` names; make relative ``$file`` paths absolute (the copy lives elsewhere)."""
    if isinstance(node, dict):
        if len(node) == 1 and "$env" in node:
            env_names.add(str(node["$env"]))
            return
        if len(node) == 1 and "$file" in node:
            path = Path(str(node["$file"])).expanduser()
            node["$file"] = str(path if path.is_absolute() else base / path)
            return
        for value in node.values():
            _walk_secrets(value, base, env_names)
    elif isinstance(node, list):
        for value in node:
            _walk_secrets(value, base, env_names)


_RATE_STRING = re.compile(r"(\d+)(\s*(?:/|per\b))")


def _unlimit(node: Any) -> Any:
    """Every positive integer -> HUGE, and "N/minute" or "N per minute" strings -> "HUGE/minute".

    Blunt on purpose: it does not need to know a limits plugin's schema. It also raises numbers
    that are windows or queue sizes, which only makes the limit looser. Floats, durations such
    as "1m", zeros and booleans are left alone.
    """
    if isinstance(node, dict):
        return {k: _unlimit(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unlimit(v) for v in node]
    if isinstance(node, int) and not isinstance(node, bool) and node > 0:
        return HUGE
    if isinstance(node, str):
        return _RATE_STRING.sub(lambda m: f"{HUGE}{m.group(2)}", node)
    return node


def bench_policy(
    src: Path, emulator_url: str, state_dir: Path
) -> tuple[dict[str, Any], list[str], set[str]]:
    """The shipped policy with only what the bench needs changed; returns (policy, changes, env).

    - every provider's ``base_url`` points at the emulator (``/v1`` suffix for OpenAI kinds);
    - ``state.dir`` is a temporary folder, so no key or state file of a real deployment is used;
    - every tier value named ``*_per_*`` that is an integer becomes HUGE (quota, rpm, tpm):
      the bench sends tens of thousands of requests from one key and must not measure 429s;
    - ``chain`` items named ``limits`` keep their place in the chain (their cost is part of
      the gateway's) but their config goes through ``_unlimit``.
    The plugin chain itself is never reordered, disabled or trimmed.
    """
    data = yaml.safe_load(src.read_text())
    changes: list[str] = []
    for name, provider in (data.get("providers") or {}).items():
        suffix = "/v1" if provider.get("kind") == "openai" else ""
        provider["base_url"] = emulator_url + suffix
        changes.append(f"providers.{name}.base_url -> emulator")
    data["state"] = {**(data.get("state") or {}), "dir": str(state_dir)}
    changes.append("state.dir -> temp dir")
    for tier_name, tier in (data.get("tiers") or {}).items():
        for key, value in tier.items():
            if "_per_" in key and isinstance(value, int) and not isinstance(value, bool):
                tier[key] = HUGE
                changes.append(f"tiers.{tier_name}.{key}: {value} -> {HUGE}")
    for i, item in enumerate(data.get("chain") or []):
        if item.get("name") == "limits" and item.get("config"):
            item["config"] = _unlimit(item["config"])
            changes.append(f"chain[{i}] (limits).config: integers and rates -> {HUGE}")
    env_names: set[str] = set()
    _walk_secrets(data, src.resolve().parent, env_names)
    return data, changes, env_names


def pick_tier(policy: dict[str, Any]) -> str:
    """The plan with the highest priority (usually the one with every feature)."""
    tiers = policy.get("tiers") or {}
    if not tiers:
        return "bench"
    return str(max(tiers, key=lambda t: (tiers[t] or {}).get("priority", 0)))


# ---- load generators -----------------------------------------------------------------------

_LUA = """\
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = {auth}

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}},' ..
    '"latency_us":{{"min":%.1f,"mean":%.1f,"stdev":%.1f,"max":%.1f,' ..
    '"p50":%.1f,"p90":%.1f,"p99":%.1f,"p999":%.1f}}}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
"""


def write_lua(path: Path, key: str) -> None:
    """A wrk script posting the small chat completion; done() prints one JSON line.

    json.dumps of an ASCII string is also a valid Lua string literal.
    """
    body = json.dumps(SMALL_BODY, separators=(",", ":"))
    path.write_text(_LUA.format(body=json.dumps(body), auth=json.dumps(f"Bearer {key}")))


def wrk_version() -> str:
    """`wrk --version` prints e.g. "wrk debian/4.1.0-3+b2 [epoll] ..." (and exits 1)."""
    proc = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    m = re.search(r"^wrk (\S+)", proc.stdout + proc.stderr, re.MULTILINE)
    return m.group(1) if m else "unknown"


def run_wrk(
    url: str, script: Path, threads: int, conns: int, seconds: int, *, check: bool = True
) -> dict[str, Any]:
    """One wrk run; raises BenchError if any request got a non-2xx/3xx status."""
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s"]
    argv += ["--latency", "-s", str(script), url]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    result: dict[str, Any] = json.loads(line.removeprefix("BENCH_RESULT "))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    if check and result["errors"]["status"]:
        raise BenchError(f"{url}: {result['errors']['status']} non-2xx replies:\n{proc.stdout}")
    return result


# ---- HTTP helpers --------------------------------------------------------------------------


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    """A blocking JSON request for setup and sanity checks (never timed)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with _HTTP.open(req, timeout=10) as resp:
        return json.loads(resp.read())


def wait_ready(url: str, timeout: float = 30.0) -> None:
    """Poll the gateway's /readyz until its plugins have started."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if http("GET", url).get("status") == "ready":
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{url} never became ready")
        time.sleep(0.1)


def emulator_requests(emu: str) -> int:
    return int(http("GET", f"{emu}/_emulator/stats")["requests"])


# ---- measuring ------------------------------------------------------------------------------


@dataclass(slots=True)
class Target:
    """A URL to load and the server process (if any) whose CPU and memory are tracked."""

    name: str
    base: str
    pid: int | None

    @property
    def url(self) -> str:
        return self.base + CHAT


def rotated(targets: list[Target], k: int) -> list[Target]:
    """Round k starts at a different target, so no target always runs first or last."""
    k %= len(targets)
    return targets[k:] + targets[:k]


async def _ttfb(targets: list[Target], key: str, settings: Settings) -> dict[str, Any]:
    """Sequential streamed requests, one keep-alive connection per target, in interleaved
    rounds; returns ms from sending a request to its first body chunk, per target."""
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "x-emulator-words": str(STREAM_WORDS),
        "x-emulator-chunk-delay-ms": str(STREAM_CHUNK_DELAY_MS),
    }
    payload = json.dumps({**SMALL_BODY, "stream": True, "max_tokens": 64}).encode()
    samples: dict[str, list[float]] = {t.name: [] for t in targets}
    events: dict[str, int] = {}

    async def one(session: aiohttp.ClientSession, target: Target) -> float:
        t0 = time.perf_counter()
        async with session.post(target.url, data=payload, headers=headers) as resp:
            first = await resp.content.readany()
            t1 = time.perf_counter()
            body = first + await resp.read()
        if resp.status != 200 or not first or not body.rstrip().endswith(b"[DONE]"):
            raise BenchError(f"{target.name}: bad stream (HTTP {resp.status}): {body[:300]!r}")
        events[target.name] = body.count(b"\n\n")
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
    for who in ("proxy", "emulator"):
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


def throughput_round(
    target: Target, emu: str, emu_pid: int, lua: Path, seconds: int
) -> dict[str, Any]:
    """One c=32 wrk run with the CPU the proxy and the emulator spent during it."""
    pids = {"emulator": emu_pid} | ({"proxy": target.pid} if target.pid else {})
    upstream0 = emulator_requests(emu)
    cpu0 = {n: cpu_seconds(p) for n, p in pids.items()}
    t0 = time.monotonic()
    result = run_wrk(target.url, lua, 2, 32, seconds)
    result["wall_s"] = time.monotonic() - t0
    for n, p in pids.items():
        result[f"{n}_cpu_s"] = cpu_seconds(p) - cpu0[n]
    result["upstream_requests"] = emulator_requests(emu) - upstream0
    return result


def measure(
    targets: list[Target], emu: str, emu_pid: int, key: str, lua: Path, settings: Settings
) -> dict[str, dict[str, Any]]:
    """Sanity and warm-up, then c=1 latency, TTFB and c=32 throughput, each phase in rounds
    that alternate the targets, so slow drift or a noisy neighbour hits all of them alike."""
    out: dict[str, dict[str, Any]] = {t.name: {} for t in targets}
    for t in targets:
        reply = http("POST", t.url, SMALL_BODY, {"Authorization": f"Bearer {key}"})
        if not reply.get("choices"):
            raise BenchError(f"{t.name}: unexpected reply {reply}")
        run_wrk(t.url, lua, 2, 32, settings.warmup_s)  # warm pools, caches and the allocator

    print("  latency at c=1 ...", file=sys.stderr, flush=True)
    seconds = max(1, round(settings.latency_s / settings.rounds))
    latency: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for k in range(settings.rounds):
        for t in rotated(targets, k):
            latency[t.name].append(run_wrk(t.url, lua, 1, 1, seconds))

    print("  streaming TTFB ...", file=sys.stderr, flush=True)
    ttfb = measure_ttfb(targets, key, settings)

    print("  throughput at c=32 ...", file=sys.stderr, flush=True)
    seconds = max(1, round(settings.throughput_s / settings.rounds))
    throughput: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for k in range(settings.rounds):
        for t in rotated(targets, k):
            throughput[t.name].append(throughput_round(t, emu, emu_pid, lua, seconds))

    for t in targets:
        out[t.name]["latency_c1"] = combine(latency[t.name])
        out[t.name]["ttfb"] = ttfb[t.name]
        out[t.name]["throughput_c32"] = combine(throughput[t.name])
        if t.pid:
            out[t.name]["memory_after_load"] = memory_mb(t.pid)
    return out


# ---- report --------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release()}


def git_revision() -> str:
    """The measured code's commit (read-only git calls), with "+dirty" for local edits."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "proxy", "plugins", "policies.yaml"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (rev or "unknown") + ("+dirty" if dirty else "")


def evaluate(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The four targets, each with its measured value and verdict."""
    t = r["targets"]
    lat = {n: t[n]["latency_c1"]["latency_us"]["p50"] / 1000 for n in t}
    rps = {n: t[n]["throughput_c32"]["rps"] for n in t}
    ttfb = {n: t[n]["ttfb"]["p50_ms"] for n in t}
    checks = [
        ("gateway p50 overhead over direct, c=1", lat["gateway"] - lat["direct"], "<=", 1.0, "ms"),
        (
            "gateway throughput / bare proxy, c=32",
            rps["gateway"] / rps["bare"] * 100,
            ">=",
            70,
            "%",
        ),
        ("gateway streaming TTFB overhead, p50", ttfb["gateway"] - ttfb["direct"], "<=", 1.5, "ms"),
        ("gateway idle RSS", r["memory_idle"]["gateway"]["rss_mb"], "<=", 120, "MB"),
    ]
    out = []
    for name, value, op, limit, unit in checks:
        ok = value <= limit if op == "<=" else value >= limit
        out.append(
            {"target": name, "value": value, "op": op, "limit": limit, "unit": unit, "pass": ok}
        )
    return out


def render(r: dict[str, Any]) -> str:
    """results.md: context first (numbers without their machine mean little), then the data."""
    t = r["targets"]
    names = ("direct", "bare", "gateway")
    m = r["machine"]

    def row(label: str, get: Any, fmt: str = "{:.2f}", ratio: bool = False) -> str:
        vals = []
        for n in names:
            try:
                v = get(n)
            except KeyError:
                v = None
            vals.append("-" if v is None else fmt.format(v))
        extra = ""
        if ratio:
            g, b = get("gateway"), get("bare")
            extra = f"{g / b:.2f}x" if b else "-"
        return f"| {label} | " + " | ".join(vals) + f" | {extra} |"

    def lat(q: str) -> Any:
        return lambda n: t[n]["latency_c1"]["latency_us"][q] / 1000

    def over(q: str) -> Any:
        return lambda n: None if n == "direct" else lat(q)(n) - lat(q)("direct")

    def tp(k: str) -> Any:
        return lambda n: t[n]["throughput_c32"][k]

    def ttfb(k: str) -> Any:
        return lambda n: t[n]["ttfb"][k]

    def mem(phase: str, k: str) -> Any:
        def get(n: str) -> float | None:
            if phase == "idle":
                return r["memory_idle"].get(n, {}).get(k)  # type: ignore[no-any-return]
            return t[n].get("memory_after_load", {}).get(k)  # type: ignore[no-any-return]

        return get

    s = r["settings"]
    lines = [
        "# Tollway benchmark results",
        "",
        "Generated by `bench/run.py`"
        + (" --quick" if r["quick"] else "")
        + "; see bench/README.md.",
        "",
        "| | |",
        "|---|---|",
        f"| date | {r['date']} |",
        f"| machine | {m['nproc']} x {m['cpu']}, Linux {m['kernel']} |",
        f"| versions | Python {r['versions']['python']}, aiohttp {r['versions']['aiohttp']}, "
        f"uvloop {r['versions']['uvloop']}, wrk {r['versions']['wrk']} |",
        f"| tollway | {r['revision']} |",
        f"| chain measured | {', '.join(r['chain']) or '(empty)'} |",
        f"| policy changes | {'; '.join(r['policy_changes'])} |",
        f"| request | POST {CHAT}, model {MODEL}, {r['body_bytes']} B JSON body, non-streaming |",
        f"| runs | per target: c=1 wrk -t1 -c1 {s['latency_s']}s; c=32 wrk -t2 -c32 "
        f"{s['throughput_s']}s; TTFB {s['ttfb_requests']} sequential streams of "
        f"~{t['gateway']['ttfb']['events']} events {STREAM_CHUNK_DELAY_MS} ms apart. Each "
        f"split into {s['rounds']} rounds alternating the targets; wrk percentiles are the "
        "median of the rounds' |",
        "",
        "| metric | direct | bare proxy | gateway | gateway / bare |",
        "|---|---:|---:|---:|---:|",
        row("latency p50, c=1 (ms)", lat("p50"), "{:.3f}"),
        row("latency p99, c=1 (ms)", lat("p99"), "{:.3f}"),
        row("overhead p50 vs direct, c=1 (ms)", over("p50"), "{:+.3f}"),
        row("overhead p99 vs direct, c=1 (ms)", over("p99"), "{:+.3f}"),
        row("throughput, c=32 (req/s)", tp("rps"), "{:,.0f}", ratio=True),
        row("latency p50, c=32 (ms)", lambda n: tp("latency_us")(n)["p50"] / 1000, "{:.2f}"),
        row("latency p99, c=32 (ms)", lambda n: tp("latency_us")(n)["p99"] / 1000, "{:.2f}"),
        row("streaming TTFB p50 (ms)", ttfb("p50_ms"), "{:.3f}"),
        row("streaming TTFB p99 (ms)", ttfb("p99_ms"), "{:.3f}"),
        row(
            "TTFB overhead p50 vs direct (ms)",
            lambda n: None if n == "direct" else ttfb("p50_ms")(n) - ttfb("p50_ms")("direct"),
            "{:+.3f}",
        ),
        row("proxy CPU per request, c=32 (µs)", tp("proxy_cpu_us_per_request"), "{:.0f}", True),
        row("proxy CPU used, c=32 (cores)", tp("proxy_cores"), "{:.2f}"),
        row("emulator CPU used, c=32 (cores)", tp("emulator_cores"), "{:.2f}"),
        row("upstream calls per request", tp("upstream_per_request"), "{:.3f}"),
        row("RSS idle after start (MB)", mem("idle", "rss_mb"), "{:.1f}"),
        row("RSS after load (MB)", mem("load", "rss_mb"), "{:.1f}"),
        row("peak RSS (MB)", mem("load", "peak_rss_mb"), "{:.1f}"),
        "",
        "| target | limit | measured | result |",
        "|---|---:|---:|:---:|",
    ]
    for c in r["checks"]:
        lines.append(
            f"| {c['target']} | {c['op']} {c['limit']} {c['unit']} | {c['value']:.2f} {c['unit']} "
            f"| {'PASS' if c['pass'] else 'FAIL'} |"
        )
    lines += ["", *(f"- {note}" for note in r["notes"]), ""]
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM behaves like Ctrl-C, so the ``finally`` that stops the servers always runs."""
    raise KeyboardInterrupt


def run(settings: Settings, quick: bool, policy_src: Path) -> dict[str, Any]:
    """Start the servers, measure, stop them whatever happens; return the raw report."""
    notes: list[str] = []
    wrk = wrk_version()
    if PINNED_WRK not in wrk:
        notes.append(f"wrk is {wrk}, not the pinned {PINNED_WRK}: numbers may not compare")
        print(f"warning: {notes[-1]}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="tollway-bench-") as tmp_name:
        tmp = Path(tmp_name)
        procs = Processes(tmp)
        try:
            return _run(settings, quick, policy_src, tmp, procs, notes, wrk)
        except BenchError:
            for name in procs.procs:
                print(f"--- {name} log ---\n{procs.tail(name)}", file=sys.stderr)
            raise
        finally:
            procs.stop_all()


def _run(
    settings: Settings,
    quick: bool,
    policy_src: Path,
    tmp: Path,
    procs: Processes,
    notes: list[str],
    wrk: str,
) -> dict[str, Any]:
    bindir = Path(sys.executable).parent
    tollway = [str(bindir / "tollway")] if (bindir / "tollway").exists() else []
    tollway = tollway or [sys.executable, "-m", "proxy.cli"]

    emu_proc, emu_port = procs.start("emulator", [*tollway, "emulator", "--port", "0"])
    emu = f"http://127.0.0.1:{emu_port}"

    policy, changes, env_names = bench_policy(policy_src, emu, tmp / "state")
    env = dict(os.environ)
    for name in env_names:  # provider keys etc.: the emulator accepts any
        env.setdefault(name, f"bench-{name.lower()}")
    env["TOLLWAY_ADMIN_KEY"] = "admin_" + secrets.token_urlsafe(18)
    policy_path = tmp / "policy.yaml"
    policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))
    check = subprocess.run(
        [*tollway, "check", str(policy_path)], capture_output=True, text=True, env=env
    )
    if check.returncode != 0:
        raise BenchError(f"the generated policy is invalid:\n{check.stdout}{check.stderr}")
    m = re.search(r"chain: (.*)\)$", check.stdout.strip())
    chain = [] if not m or m.group(1) == "empty" else m.group(1).split(", ")

    tier = pick_tier(policy)
    created = subprocess.run(
        [
            *tollway,
            "keys",
            "--state-dir",
            str(tmp / "state"),
            "create",
            "--user",
            "bench",
            "--tier",
            tier,
            "-q",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    key = created.stdout.strip().splitlines()[-1]

    gw_proc, gw_port = procs.start(
        "gateway",
        [*tollway, "serve", "--policy", str(policy_path), "--host", "127.0.0.1", "--port", "0"],
        env=env,
    )
    bare_proc, bare_port = procs.start(
        "bare", [sys.executable, str(BENCH / "bare_proxy.py"), "--upstream", emu, "--port", "0"]
    )
    gateway = f"http://127.0.0.1:{gw_port}"
    wait_ready(f"{gateway}/readyz")
    time.sleep(0.5)  # let start-up allocations settle before reading idle memory
    idle = {"gateway": memory_mb(gw_proc.pid), "bare": memory_mb(bare_proc.pid)}

    lua = tmp / "chat.lua"
    write_lua(lua, key)
    targets = [
        Target("direct", emu, None),
        Target("bare", f"http://127.0.0.1:{bare_port}", bare_proc.pid),
        Target("gateway", gateway, gw_proc.pid),
    ]
    print("measuring direct, bare and gateway in alternating rounds ...", file=sys.stderr)
    servers = [emu_proc.pid, bare_proc.pid, gw_proc.pid]
    load0 = CpuSnapshot.take(servers)
    results = measure(targets, emu, emu_proc.pid, key, lua, settings)
    background = CpuSnapshot.take(servers).background_since(load0)
    procs.check_alive()

    direct_rps = results["direct"]["throughput_c32"]["rps"]
    bare_tp = results["bare"]["throughput_c32"]
    headroom = direct_rps / bare_tp["rps"]
    notes.append(
        f"direct throughput is {headroom:.2f}x the bare proxy's; the emulator used "
        f"{bare_tp['emulator_cores']:.2f} cores during the bare run "
        + (
            "(the emulator may be what bounds the proxied runs)."
            if headroom < 1.3 or bare_tp["emulator_cores"] > 0.9
            else "(the emulator is not what bounds the proxied runs)."
        )
    )
    if (os.cpu_count() or 1) <= 2:
        notes.append(
            "on ≤2 cores wrk, the proxy and the emulator share the CPUs: c=32 throughput is a "
            "relative number (gateway vs bare), not capacity."
        )
    notes.append(
        f"other processes on this machine used {background['other_cores']:.2f} cores on average "
        f"while measuring (hypervisor steal {background['steal_cores']:.2f} cores)"
        + ("; expect noisy numbers." if background["other_cores"] > 0.2 else ".")
    )
    for name, r in results.items():
        rounds = [x["latency_us"]["p50"] for x in r["latency_c1"]["rounds"]]
        if len(rounds) > 1 and rounds[-1] > 1.3 * rounds[0] and rounds[-1] - rounds[0] > 200:
            notes.append(
                f"{name}: c=1 p50 rose from {rounds[0] / 1000:.2f} to {rounds[-1] / 1000:.2f} ms "
                "across rounds: something grows with the requests served (e.g. rate-limit "
                "windows holding every request under the raised limits), or the load changed."
            )
        errors = {k: v for k, v in r["throughput_c32"]["errors"].items() if v}
        if errors:
            notes.append(f"{name}: wrk socket errors at c=32: {errors}")

    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": quick,
        "machine": machine(),
        "versions": {
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "uvloop": version("uvloop"),
            "wrk": wrk,
        },
        "revision": git_revision(),
        "chain": chain,
        "tier": tier,
        "policy_changes": changes,
        "body_bytes": len(json.dumps(SMALL_BODY, separators=(",", ":"))),
        "settings": {
            "latency_s": settings.latency_s,
            "throughput_s": settings.throughput_s,
            "warmup_s": settings.warmup_s,
            "ttfb_requests": settings.ttfb_requests,
            "rounds": settings.rounds,
        },
        "memory_idle": idle,
        "background": background,
        "targets": results,
        "notes": notes,
    }
    report["checks"] = evaluate(report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tollway overhead benchmark (loopback only)")
    parser.add_argument("--quick", action="store_true", help="short runs (~1 min), less precise")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target fails")
    parser.add_argument("--policy", type=Path, default=ROOT / "policies.yaml")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    try:
        report = run(QUICK if args.quick else FULL, args.quick, args.policy)
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 2
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    markdown = render(report)
    (BENCH / "results.md").write_text(markdown)
    (BENCH / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown)
    failed = [c for c in report["checks"] if not c["pass"]]
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
