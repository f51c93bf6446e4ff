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
import copy
import dataclasses
import json
import os
import platform
import re
import resource
import secrets
import shutil
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
SMALL_BODY: dict[str, Any] = {
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
        """Start ``argv`` and wait for its "listening on http://host:PORT" line; return PORT."""
        proc = self.spawn(name, argv, env)
        return proc, self.port(name, timeout)

    def spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` without waiting (servers that start in parallel start faster).

        Output goes to a file, not a pipe: a pipe nobody drains would block a chatty server.
        """
        path = self.logdir / f"{name}.log"
        log = path.open("w")
        self._logs[name] = log
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        self.procs[name] = proc
        return proc

    def port(self, name: str, timeout: float = 30.0) -> int:
        """Wait for the "listening on http://host:PORT" line of a spawned server."""
        path = self.logdir / f"{name}.log"
        proc = self.procs[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = LISTENING.search(path.read_text())
            if m:
                return int(m.group(1))
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


def cpu_seconds(pid: int, main_thread: bool = False) -> float:
    """utime + stime of a process (all its threads) from /proc/PID/stat (fields 14 and 15), in
    seconds; with ``main_thread``, of its main thread only (the event loop's)."""
    path = f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat"
    stat = Path(path).read_text()
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


_MEMORY_FIELDS = {
    "VmRSS": "rss_mb",
    "VmHWM": "peak_rss_mb",
    "RssAnon": "rss_anon_mb",
    "RssFile": "rss_file_mb",
}


def memory_mb(pid: int) -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory in MB, and the current split into
    anonymous memory (the heap: what the process allocated) and file-backed pages (mostly
    shared libraries' code, which the kernel can drop and read back)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in _MEMORY_FIELDS:
            out[_MEMORY_FIELDS[key]] = int(value.split()[0]) / 1024
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


def bench_policy(src: Path, emulator_url: str) -> tuple[dict[str, Any], list[str], set[str]]:
    """The shipped policy with only what the bench needs changed; returns (policy, changes, env).

    - every provider's ``base_url`` points at the emulator (``/v1`` suffix for OpenAI kinds);
    - every tier value named ``*_per_*`` that is an integer becomes HUGE (quota, rpm, tpm):
      the bench sends tens of thousands of requests from one key and must not measure 429s;
    - ``chain`` items named ``limits`` keep their place in the chain (their cost is part of
      the gateway's) but their config goes through ``_unlimit``.
    The plugin chain itself is never reordered, disabled or trimmed here; ``variant`` takes a
    prefix of it and moves every file the gateway writes into a temporary folder.
    """
    data = yaml.safe_load(src.read_text())
    changes: list[str] = []
    for name, provider in (data.get("providers") or {}).items():
        suffix = "/v1" if provider.get("kind") == "openai" else ""
        provider["base_url"] = emulator_url + suffix
        changes.append(f"providers.{name}.base_url -> emulator")
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


# config keys of chain items that name a file or folder the plugin writes (metering's
# ``database`` and ``spool_dir``, ...): a bench must never touch a deployment's data.
_FILE_KEY = re.compile(r"^(database|db|path|file|dir|\w+_(dir|path|db))$")


def _redirect_files(node: Any, dest: Path, where: str, changes: list[str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if isinstance(v, str) and _FILE_KEY.match(str(k)):
                out[k] = str(dest / Path(v).name)
                changes.append(f"{where}.{k}: {v} -> temp dir")
            else:
                out[k] = _redirect_files(v, dest, f"{where}.{k}", changes)
        return out
    if isinstance(node, list):
        return [_redirect_files(v, dest, f"{where}[{i}]", changes) for i, v in enumerate(node)]
    return node


def variant(
    base: dict[str, Any], n: int, folder: Path
) -> tuple[dict[str, Any], list[str], list[str]]:
    """The bench policy with only the first ``n`` chain items; returns (policy, chain, changes).

    Each gateway gets its own ``state.dir`` and its own folder for plugin files under
    ``folder``, so prefixes never share a quota file or a database.
    """
    policy = copy.deepcopy(base)
    items = (policy.get("chain") or [])[:n]
    changes = ["state.dir -> temp dir"]
    policy["state"] = {**(policy.get("state") or {}), "dir": str(folder / "state")}
    for i, item in enumerate(items):
        if item.get("config"):
            where = f"chain[{i}] ({item.get('name')}).config"
            item["config"] = _redirect_files(item["config"], folder / "files", where, changes)
    policy["chain"] = items
    return policy, [str(item.get("name")) for item in items], changes


def create_bench_key(
    tollway: list[str], folder: Path, policy: dict[str, Any], env: dict[str, str]
) -> str:
    """A key for user "bench" on the policy's top plan, made with ``tollway keys --state-dir``
    in ``folder`` (its ``keys.json`` is then copied into each gateway's state)."""
    argv = [*tollway, "keys", "--state-dir", str(folder), "create"]
    argv += ["--user", "bench", "--tier", pick_tier(policy), "-q"]
    made = subprocess.run(argv, capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    return made.stdout.strip().splitlines()[-1]


def write_variant(
    base: dict[str, Any], n: int, folder: Path, keys_json: Path
) -> tuple[Path, list[str], list[str]]:
    """``variant`` written to ``folder/policy.yaml`` with the bench key's ``keys.json`` in its
    state folder; returns (policy file, chain, changes)."""
    policy, names, changes = variant(base, n, folder)
    (folder / "state").mkdir(parents=True)
    shutil.copy(keys_json, folder / "state" / "keys.json")
    path = folder / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path, names, changes


def pick_tier(policy: dict[str, Any]) -> str:
    """The plan with the highest priority (usually the one with every feature)."""
    tiers = policy.get("tiers") or {}
    if not tiers:
        return "bench"
    return str(max(tiers, key=lambda t: (tiers[t] or {}).get("priority", 0)))


# ---- load generators -----------------------------------------------------------------------

_LUA = """\
-- Every request is distinct (thread id, counter and a per-run nonce in the prompt), as real
-- traffic is: a chain that caches or coalesces identical requests must still do its work.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = {auth}
local body_fmt = {body_fmt}
local threads = 0
local counter, nonce = 0, ""
tid = 0  -- a global: setup() sets it in each thread's own Lua state

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  nonce = args[1] or ""
  counter = 0
end

function request()
  counter = counter + 1
  return wrk.format(nil, nil, nil, string.format(body_fmt, nonce, tid, counter))
end

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


def unique_body(tag: str, **extra: Any) -> dict[str, Any]:
    """The small chat completion with ``tag`` appended to its prompt (a distinct request)."""
    message = {**SMALL_BODY["messages"][0]}
    message["content"] = f"{message['content']} {tag}"
    return {**SMALL_BODY, "messages": [message], **extra}


def write_lua(path: Path, key: str) -> None:
    """A wrk script posting distinct small chat completions; done() prints one JSON line.

    json.dumps of an ASCII string is also a valid Lua string literal; the ``%s-%d-%d``
    placeholder becomes nonce-thread-counter.
    """
    fmt = json.dumps(unique_body("%s-%d-%d"), separators=(",", ":"))
    path.write_text(_LUA.format(body_fmt=json.dumps(fmt), auth=json.dumps(f"Bearer {key}")))


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
    argv += ["--latency", "-s", str(script), url, "--", secrets.token_hex(4)]
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


def http(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    reply_headers: dict[str, str] | None = None,
) -> Any:
    """A blocking JSON request for setup and sanity checks (never timed)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with _HTTP.open(req, timeout=10) as resp:
        if reply_headers is not None:
            reply_headers.update({k.lower(): v for k, v in resp.headers.items()})
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
    admin_key: str | None = None  # set for a gateway whose chain has a usage database

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


def settle(pid: int, quiet_s: float = 0.15, max_s: float = 3.0) -> None:
    """Wait until the process has used (almost) no CPU for ``quiet_s``, so work it deferred
    past the end of the load (a background task) is counted in its round, not the next one."""
    deadline = time.monotonic() + max_s
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = cpu_seconds(pid)
        if now - last <= 1.5 / os.sysconf("SC_CLK_TCK"):
            return
        last = now


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


# ---- profile ------------------------------------------------------------------------------

_FRAME = re.compile(r"^(.*) \((.*):(\d+)\)$")


def profile_gateway(target: Target, lua: Path, seconds: int, tmp: Path) -> dict[str, Any]:
    """py-spy the gateway for ``seconds`` under c=32 wrk load; aggregated by function."""
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if pyspy is None or target.pid is None:
        raise BenchError("--profile needs py-spy (.venv/bin/pip install py-spy)")
    print(f"  profiling the gateway for {seconds} s under c=32 ...", file=sys.stderr, flush=True)
    raw = tmp / "profile.raw"
    argv = ["wrk", "-t2", "-c32", f"-d{seconds + 5}s", "--timeout", "10s", "-s", str(lua)]
    load = subprocess.Popen(
        [*argv, target.url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(1.5)
        spy_argv = [pyspy, "record", "--pid", str(target.pid), "--duration", str(seconds)]
        spy_argv += ["--rate", "200", "--format", "raw", "--full-filenames", "--function"]
        spy = subprocess.run(
            [*spy_argv, "-o", str(raw)],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
        )
        if spy.returncode != 0 or not raw.exists():
            raise BenchError(f"py-spy failed:\n{spy.stdout}{spy.stderr}")
    finally:
        try:
            load.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            load.kill()
            load.wait()
    return aggregate_profile(raw.read_text(), seconds)


def _own(path: str) -> str | None:
    """``proxy/x.py`` or ``plugins/x.py`` for the gateway's own files, else None."""
    for pkg in ("proxy", "plugins"):
        folder = str(ROOT / pkg) + os.sep
        if path.startswith(folder):
            return f"{pkg}/{path[len(folder) :]}"
    return None


def _area(path: str) -> str:
    own = _own(path)
    if own:
        return own.split("/")[0] + "/"
    m = re.search(r"site-packages/([^/]+)", path)
    if m:
        return m.group(1).removesuffix(".py")
    return "python stdlib" if path.startswith("/") else path


def aggregate_profile(text: str, seconds: int) -> dict[str, Any]:
    """Collapsed stacks -> per-function samples.

    - ``own_inclusive``: samples with a gateway function anywhere on the stack;
    - ``own_deepest``: samples charged to the deepest gateway function on the stack, i.e. its
      own code plus the library code it calls directly (orjson, hashlib, os.write, ...);
    - ``leaf``: the function actually running, anywhere; ``areas``: leaf samples by package.
    """
    total = 0
    inclusive: dict[str, int] = {}
    deepest: dict[str, int] = {}
    leaf: dict[str, int] = {}
    areas: dict[str, int] = {}
    for line in text.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = []
        for f in stack.split(";"):
            m = _FRAME.match(f)
            frames.append((m.group(1), m.group(2)) if m else (f, ""))
        own_names = []
        for func, path in frames:
            own = _own(path)
            if own:
                own_names.append(f"{own}:{func}")
        for name in set(own_names):
            inclusive[name] = inclusive.get(name, 0) + count
        if own_names:
            deepest[own_names[-1]] = deepest.get(own_names[-1], 0) + count
        func, path = frames[-1]
        short = _own(path) or re.sub(r"^.*?(site-packages|python3\.\d+)/", "", path)
        name = f"{short}:{func}"
        leaf[name] = leaf.get(name, 0) + count
        areas[_area(path)] = areas.get(_area(path), 0) + count

    def top(d: dict[str, int], n: int = 15) -> list[dict[str, Any]]:
        ranked = sorted(d.items(), key=lambda kv: -kv[1])[:n]
        return [{"function": k, "samples": v, "pct": 100 * v / max(total, 1)} for k, v in ranked]

    return {
        "seconds": seconds,
        "samples": total,
        "own_inclusive": top(inclusive, 20),
        "own_deepest": top(deepest, 20),
        "leaf": top(leaf, 15),
        "areas": top(areas, 12),
    }


def render_profile(p: dict[str, Any], r: dict[str, Any]) -> str:
    lines = [
        "# Gateway profile under load",
        "",
        f"`bench/run.py --profile {p['seconds']}`, {r['date']}, tollway {r['revision']}, chain: "
        f"{chain_label(r['chain'])}. py-spy at 200 Hz for {p['seconds']} s while wrk "
        f"-t2 -c32 posts the bench request; {p['samples']} non-idle samples (all threads). "
        "py-spy pauses the process for each sample, so absolute throughput during profiling is "
        "lower; shares are what matter. Regenerate for current numbers.",
        "",
    ]
    tables = [
        (
            "Gateway functions, charged with the library code they call directly "
            "(deepest proxy/ or plugins/ frame on the stack)",
            "own_deepest",
        ),
        ("Gateway functions, inclusive (on the stack)", "own_inclusive"),
        ("Where the CPU is actually running (leaf functions)", "leaf"),
        ("Leaf samples by package", "areas"),
    ]
    for title, k in tables:
        lines += [f"## {title}", "", "| function | samples | share |", "|---|---:|---:|"]
        lines += [f"| `{x['function']}` | {x['samples']} | {x['pct']:.1f} % |" for x in p[k]]
        lines.append("")
    return "\n".join(lines)


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

    def split(phase: str) -> Any:
        def get(n: str) -> str | None:
            anon, file = mem(phase, "rss_anon_mb")(n), mem(phase, "rss_file_mb")(n)
            return None if anon is None or file is None else f"{anon:.1f} / {file:.1f}"

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
        "| versions | Python "
        + ", ".join(
            f"{name} {v}" if name != "python" else str(v) for name, v in r["versions"].items()
        )
        + " |",
        f"| tollway | {r['revision']} |",
        f"| chain measured | {', '.join(r['chain']) or '(empty)'} |",
        f"| policy changes | {'; '.join(r['policy_changes'])} |",
        f"| request | POST {CHAT}, model {MODEL}, ~{r['body_bytes']} B JSON body, non-streaming, "
        "every request distinct (a counter in the prompt); "
        + (
            ", ".join(f"{k}: {v}" for k, v in t["gateway"].get("tollway_headers", {}).items())
            or "no X-Tollway-* reply headers"
        )
        + " |",
        f"| runs | per target: c=1 wrk -t1 -c1 {s['latency_s']}s; c=32 wrk -t2 -c32 "
        f"{s['throughput_s']}s; TTFB {s['ttfb_requests']} sequential streams of "
        f"~{t['gateway']['ttfb']['events']} events {STREAM_CHUNK_DELAY_MS} ms apart. Each "
        f"split into rounds alternating the targets (c=1 and TTFB {s['rounds']}, c=32 "
        f"{s.get('throughput_rounds', s['rounds'])}); wrk percentiles are the median of the "
        "rounds' |",
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
        row("RSS idle: anonymous / file-backed (MB)", split("idle"), "{}"),
        row("RSS after load (MB)", mem("load", "rss_mb"), "{:.1f}"),
        row("RSS after load: anonymous / file-backed (MB)", split("load"), "{}"),
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
    lines += render_chains(r)
    lines += render_writer(r)
    lines += ["", "Notes:", "", *(f"- {note}" for note in r["notes"])]
    if r.get("phases_s"):
        took = ", ".join(f"{k} {v:.0f} s" for k, v in r["phases_s"].items())
        lines.append(f"- time taken: {took}; {r.get('elapsed_s', 0):.0f} s in all.")
    lines.append("")
    return "\n".join(lines)


def _spread(values: list[float]) -> str:
    """The interquartile range: half the rounds fall inside it."""
    if len(values) < 4:
        return f"{min(values):+.0f} … {max(values):+.0f}"
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"{q1:+.0f} … {q3:+.0f}"


def render_chains(r: dict[str, Any]) -> list[str]:
    """The per-plugin table: each chain prefix against the same bare proxy, same rounds."""
    chains = r.get("chains") or []
    if len(chains) < 2:
        return []
    s = r["settings"]
    lines = [
        "",
        "## Cost of each plugin (c=32)",
        "",
        "Gateways running prefixes of the shipped chain, in the same "
        f"{s.get('throughput_rounds', s['rounds'])} alternating c=32 rounds as direct, bare and "
        "the full gateway. CPU = the process's utime+stime in a round (all threads: the "
        "metering loader's DuckDB work included, counted after every row of the round was "
        "loaded) ÷ the round's requests. *Median*: of the rounds; *added* is the median over "
        "rounds of the step from the row above within the same round, *IQR* the range of the "
        "middle half of those steps (a step inside a wide IQR is noise). *Best*: the least "
        "CPU of any round, and the step between best rounds; interference from the rest of "
        "the machine (wrk, the emulator and other tenants share 2 vCPUs) only adds CPU time, "
        "so the best round is the closest to the code's own cost. *Other threads*: the part "
        "not spent on the event loop's thread (DuckDB, worker threads), median. req/s and "
        "*vs bare* are totals over all rounds.",
        "",
        "| server | CPU µs/req, median | added (median) | IQR of the step | CPU µs/req, best "
        "| added (best) | other threads | req/s | vs bare | idle RSS (MB) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in chains:
        added, rounds, best = "-", "-", "-"
        if "increment_us" in c:
            added = f"{c['added']}: **{c['increment_us']:+.0f} µs**"
            rounds = _spread(c["increment_rounds_us"])
            best = f"{c['increment_best_us']:+.0f} µs"
        rss = r["memory_idle"].get(c["target"], {}).get("rss_mb")
        lines.append(
            f"| {c['label']} | {c['cpu_us_per_request']:.0f} | {added} | {rounds} "
            f"| {c['cpu_us_best_round']:.0f} | {best} "
            f"| {c['other_threads_cpu_us_per_request']:.0f} "
            f"| {c['rps']:,.0f} | {c['ratio_vs_bare']:.2f}x | "
            + ("-" if rss is None else f"{rss:.1f}")
            + " |"
        )
    for c in chains:
        if "usage_rows" in c:
            ok = 0 <= c["usage_rows_extra"] <= c["usage_rows_extra_max"]
            lines += [
                "",
                f"Metering check ({c['label']}): {c['usage_rows']:,} requests in the usage table "
                f"after the c=32 rounds for {c['usage_rows'] - c['usage_rows_extra']:,} counted "
                f"by wrk ({c['usage_rows_extra']:+d}; wrk does not count up to 32 requests in "
                f"flight when each round stops): {'OK' if ok else '**MISMATCH**'}.",
            ]
    return lines


REPEAT_NOTE = "4, into the full table"


def _metering_defaults() -> str:
    from plugins.metering.plugin import MeteringConfig

    fields = MeteringConfig.model_fields
    return f"{fields['flush_interval'].default:g} s / {fields['batch_rows'].default:,} rows"


_METERING_DEFAULTS = _metering_defaults()


def render_writer(r: dict[str, Any]) -> list[str]:
    w = r.get("writer")
    if not w:
        return []
    if "error" in w:
        return ["", "## Metering writer (bench/writer.py)", "", f"**Failed**: {w['error']}"]
    gw = r["targets"]["gateway"]["throughput_c32"]["rps"]
    need = gw  # one spool row per request
    return [
        "",
        "## Metering writer (bench/writer.py)",
        "",
        f"In one process, after the servers stopped: {w['rows']:,} rows shaped like metering's "
        f"(one per request, every spool column) appended with `plugins.spool.Spool.append`, "
        f"rotated every {w['batch_rows']:,} rows and loaded with `UsageDB.ingest` segment by "
        f"segment into a DuckDB file in a temp dir ({w['segments']} segments; appending and "
        "loading alternate, never overlap).",
        "",
        "| side | rate | cost |",
        "|---|---:|---:|",
        f"| append (hot path: orjson + a copy into the mapped segment) | {w['append_rows_per_s']:,.0f} rows/s "
        f"| {w['append_us_per_row']:.2f} µs / row |",
        f"| load into DuckDB (worker thread) | {w['load_rows_per_s']:,.0f} rows/s "
        f"| {w['load_ms_per_segment_median']:.0f} ms / segment (median), "
        f"{w['load_cpu_us_per_row']:.1f} µs CPU / row on {w['load_cores']:.2f} cores |",
        f"| load, first / last segment | {w['load_rows_per_s_first_segment']:,.0f} / "
        f"{w['load_rows_per_s_last_segment']:,.0f} rows/s | table grows to "
        f"{w['requests_in_table']:,} requests, {w['db_mb']:.1f} MB |",
        *(
            f"| load, segments of {x['rows']:,} rows (median of {REPEAT_NOTE}) "
            f"| {x['rows_per_s']:,.0f} rows/s | {x['ms']:.0f} ms / segment, {x['cpu_ms']:.0f} ms "
            "CPU |"
            for x in w.get("by_segment_size", [])
        ),
        "",
        "The plugin closes a segment every `flush_interval` or `batch_rows` rows, whichever "
        f"comes first ({_METERING_DEFAULTS} by default): the fixed cost of one `ingest` call "
        "weighs less the larger the segment, as the rows above show.",
        "",
        f"The full gateway served {gw:,.0f} req/s at c=32 here, i.e. {need:,.0f} rows/s"
        + _loader_load(w, need)
        + ("" if w["ok"] else " — **row count mismatch in the table: the load is broken**")
        + ".",
    ]


def _loader_load(w: dict[str, Any], rows_per_s: float) -> str:
    """How busy the loader is at ``rows_per_s``, from the 5,000-row load rate (segments at that
    rate are at least as large with the plugin's defaults, so this is an upper bound)."""
    busy = rows_per_s / w["load_rows_per_s"]
    return (
        f"; loading them at the 5,000-row rate keeps the loader thread busy ~{busy * 100:.0f} % "
        "of the time at most (larger segments cost less per row; the spool absorbs any backlog)"
    )


# ---- main ----------------------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM behaves like Ctrl-C, so the ``finally`` that stops the servers always runs."""
    raise KeyboardInterrupt


def run(settings: Settings, quick: bool, opts: argparse.Namespace) -> dict[str, Any]:
    """Start the servers, measure, stop them whatever happens; then the writer measurement."""
    notes: list[str] = []
    wrk = wrk_version()
    if PINNED_WRK not in wrk:
        notes.append(f"wrk is {wrk}, not the pinned {PINNED_WRK}: numbers may not compare")
        print(f"warning: {notes[-1]}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="tollway-bench-") as tmp_name:
        tmp = Path(tmp_name)
        procs = Processes(tmp)
        try:
            report = _run(settings, quick, opts, tmp, procs, notes, wrk)
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


def measure_writer(rows: int) -> dict[str, Any]:
    """bench/writer.py in its own process (DuckDB's threads and memory stay out of this one).

    A failure is reported in the results, not raised: the server measurements stand alone.
    """
    proc = subprocess.run(
        [sys.executable, str(BENCH / "writer.py"), "--rows", str(rows), "--json"],
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


def chain_label(chain: list[str]) -> str:
    return ", ".join(chain) if chain else "(empty)"


def _run(
    settings: Settings,
    quick: bool,
    opts: argparse.Namespace,
    tmp: Path,
    procs: Processes,
    notes: list[str],
    wrk: str,
) -> dict[str, Any]:
    bindir = Path(sys.executable).parent
    tollway = [str(bindir / "tollway")] if (bindir / "tollway").exists() else []
    tollway = tollway or [sys.executable, "-m", "proxy.cli"]

    t_start = time.monotonic()
    emu_proc, emu_port = procs.start("emulator", [*tollway, "emulator", "--port", "0"])
    emu = f"http://127.0.0.1:{emu_port}"

    base, changes, env_names = bench_policy(opts.policy, emu)
    if opts.prefix is not None:
        kept = (base.get("chain") or [])[: opts.prefix]
        changes.append(f"chain cut to its first {len(kept)} items (--prefix)")
        base["chain"] = kept
    env = dict(os.environ)
    for name in env_names:  # provider keys etc.: the emulator accepts any
        env.setdefault(name, f"bench-{name.lower()}")
    admin_key = "admin_" + secrets.token_urlsafe(18)
    env["TOLLWAY_ADMIN_KEY"] = admin_key

    key = create_bench_key(tollway, tmp / "keys", base, env)

    # One gateway per chain prefix: [], [c0], [c0, c1], ... and the full chain ("gateway").
    n_items = len(base.get("chain") or [])
    prefixes = list(range(n_items + 1)) if opts.chains else [n_items]
    gateways: dict[int, tuple[str, list[str], Path]] = {}
    chain: list[str] = []
    checks: dict[int, subprocess.Popen[str]] = {}
    for n in prefixes:
        path, names, vchanges = write_variant(base, n, tmp / f"gw{n}", tmp / "keys" / "keys.json")
        checks[n] = subprocess.Popen(  # in parallel: each check imports every plugin
            [*tollway, "check", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        name = "gateway" if n == n_items else f"gateway[{chain_label(names)}]"
        gateways[n] = (name, names, path)
        if n == n_items:
            changes += vchanges
    for n, check in checks.items():
        out, _ = check.communicate(timeout=60)
        if check.returncode != 0:
            raise BenchError(f"the generated policy is invalid:\n{out}")
        if n == n_items:
            m = re.search(r"chain: (.*)\)$", out.strip())
            chain = [] if not m or m.group(1) == "empty" else m.group(1).split(", ")

    bare_proc, bare_port = procs.start(
        "bare", [sys.executable, str(BENCH / "bare_proxy.py"), "--upstream", emu, "--port", "0"]
    )
    spawned = {
        n: procs.spawn(
            name,
            [*tollway, "serve", "--policy", str(path), "--host", "127.0.0.1", "--port", "0"],
            env=env,
        )
        for n, (name, _, path) in gateways.items()
    }
    started = {
        n: Target(name, f"http://127.0.0.1:{procs.port(name, 60)}", spawned[n].pid)
        for n, (name, _, _) in gateways.items()
    }
    for t in started.values():
        wait_ready(f"{t.base}/readyz")
        if has_usage_db(t.base, admin_key):
            t.admin_key = admin_key
    time.sleep(0.5)  # let start-up allocations settle before reading idle memory
    idle = {"bare": memory_mb(bare_proc.pid)}
    for t in started.values():
        assert t.pid is not None
        idle[t.name] = memory_mb(t.pid)

    lua = tmp / "chat.lua"
    write_lua(lua, key)
    full = started[n_items]
    targets = [
        Target("direct", emu, None),
        Target("bare", f"http://127.0.0.1:{bare_port}", bare_proc.pid),
        full,
    ]
    prefix_targets = [t for n, t in started.items() if n != n_items]
    print(
        f"measuring direct, bare and gateway ({chain_label(chain)})"
        + (f" + {len(prefix_targets)} chain prefixes at c=32" if prefix_targets else "")
        + " in alternating rounds ...",
        file=sys.stderr,
    )
    servers = [emu_proc.pid, bare_proc.pid, *(t.pid for t in started.values() if t.pid)]
    load0 = CpuSnapshot.take(servers)
    phases: dict[str, float] = {"start-up": round(time.monotonic() - t_start, 1)}
    results = measure(targets, prefix_targets, emu, emu_proc.pid, key, lua, settings, phases)
    background = CpuSnapshot.take(servers).background_since(load0)
    procs.check_alive()
    profile = profile_gateway(full, lua, opts.profile, tmp) if opts.profile else None
    if profile is not None and opts.profile_raw:
        shutil.copy(tmp / "profile.raw", opts.profile_raw)

    steps: list[tuple[str, str, list[str]]] = [("bare", "bare proxy", [])] + [
        (name, f"gateway, chain: {chain_label(names)}", names)
        for name, names, _ in gateways.values()
    ]
    chains = chain_costs(results, steps)

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
        if "latency_c1" in r:
            rounds = [x["latency_us"]["p50"] for x in r["latency_c1"]["rounds"]]
            if len(rounds) > 1 and rounds[-1] > 1.3 * rounds[0] and rounds[-1] - rounds[0] > 200:
                notes.append(
                    f"{name}: c=1 p50 rose from {rounds[0] / 1000:.2f} to "
                    f"{rounds[-1] / 1000:.2f} ms across rounds: something grows with the "
                    "requests served (e.g. rate-limit windows holding every request under the "
                    "raised limits), or the load changed."
                )
        errors = {k: v for k, v in r["throughput_c32"]["errors"].items() if v}
        if errors:
            notes.append(f"{name}: wrk socket errors at c=32: {errors}")
    for c in chains:
        extra = c.get("usage_rows_extra")
        if extra is not None and not 0 <= extra <= c["usage_rows_extra_max"]:
            notes.append(
                f"{c['target']}: the usage table gained {c['usage_rows']} requests for "
                f"{c['usage_rows'] - extra} sent: metering lost or doubled rows."
            )
        up = results[c["target"]]["throughput_c32"].get("upstream_per_request", 1.0)
        if up < 0.98:
            notes.append(
                f"{c['target']}: only {up:.3f} upstream calls per request at c=32 although every "
                "request is distinct: the chain answers some itself, so it does less than bare."
            )

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
        "chain": chain,
        "tier": pick_tier(base),
        "policy_changes": changes,
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
        "memory_idle": idle,
        "background": background,
        "targets": {n: results[n] for n in ("direct", "bare", "gateway")},
        "chain_targets": {t.name: results[t.name] for t in prefix_targets},
        "chains": chains,
        "profile": profile,
        "phases_s": phases,
        "notes": notes,
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
        "--profile-raw",
        type=Path,
        metavar="FILE",
        help="with --profile, also keep py-spy's raw collapsed stacks in FILE",
    )
    args = parser.parse_args(argv)
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
