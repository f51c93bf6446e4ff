"""Instructions per request, counted by callgrind: the per-plugin cost without the noise.

On a shared 2-vCPU VM the CPU time of one plugin (tens of µs) is smaller than the run-to-run
noise of ``bench/run.py``. Instruction counts are not noisy: callgrind counts the same total for
the same code and inputs whatever else the machine does, so a change to the hot path can be
compared to the last commit to within a fraction of a percent. What they do not show: time in
the kernel (socket syscalls), cache misses (the garbage collector walking memory costs far
more time than its instruction count says) and waiting. Use both: this for what the code
executes, ``bench/run.py`` for what it costs.

For each server (the bare proxy, the emulator answering directly, the gateway running each
prefix of the shipped chain, and with ``--hit`` a gateway answering cache hits) it starts the
server under ``valgrind --tool=callgrind`` with instrumentation off, warms it up with 200
requests, counts ``--requests`` requests (4 concurrent, every one distinct, as in run.py), waits
for the metering loader to load their rows, and reports thousands of instructions per request
on the event-loop thread and on all other threads (DuckDB's loader). Under callgrind the
server runs ~50x slower, so the loader's segments are smaller than at full speed and its count
per row is higher than in production; the event-loop column is unaffected.

    .venv/bin/python bench/instructions.py [--requests 300] [--policy FILE] [--hit]
        [--stream] [--prefix N ...] [--out FILE]

``--stream`` counts streamed chat completions (the relay's SSE path) instead; ``--prefix N``
(repeatable) only the gateways of those chain prefixes (0: the empty chain).
Needs valgrind (Debian: ``apt-get install valgrind``). Writes bench/instructions.md (or
``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the harness is imported as the `bench` package
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench.load import unique_body, wait_ready  # noqa: E402
from bench.policy import bench_policy, chain_label, create_bench_key, write_variant  # noqa: E402
from bench.procs import TOLLWAY, BenchError, Processes  # noqa: E402
from bench.report import git_revision  # noqa: E402

HIT_FEATURE = "confidence_analysis"
HIT_BODY = {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "explain this"}]}


async def send(
    url: str, key: str, n: int, tag: str, hit: bool = False, stream: bool = False
) -> None:
    """``n`` requests, 4 at a time; every one distinct unless ``hit`` (then one repeated).

    ``stream``: streamed chat completions (``max_tokens`` 64, ~20 SSE events each) read to
    the end, the relay path of the streaming TTFB rows; the default feature has no cache TTL,
    so the cache bypasses them as it does the non-streamed requests.
    """
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if hit:
        headers["X-Tollway-Feature"] = HIT_FEATURE
    sent = 0

    async def worker(s: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < n:
            sent += 1
            extra: dict[str, Any] = {"stream": True, "max_tokens": 64} if stream else {}
            body = HIT_BODY if hit else unique_body(f"{tag}-{sent}", **extra)
            async with s.post(url, data=json.dumps(body), headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise BenchError(f"{url}: HTTP {r.status}")
                if hit and r.headers.get("x-tollway-cache") != "hit":
                    raise BenchError(f"{url}: expected a cache hit")

    async with aiohttp.ClientSession() as s:
        if hit:  # the miss that stores the answer (and its coalesced duplicates) come first
            async with s.post(url, data=json.dumps(HIT_BODY), headers=headers) as r:
                await r.read()
        await asyncio.gather(*(worker(s) for _ in range(4)))


def _totals(prefix: Path) -> tuple[int, int]:
    """(event-loop thread, other threads) instructions from callgrind's per-thread dumps."""
    main = other = 0
    for f in prefix.parent.glob(prefix.name + "*"):
        m = re.search(r"-(\d+)$", f.name)
        thread = int(m.group(1)) if m else 1
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                value = int(line.split()[1])
                if thread == 1:
                    main += value
                else:
                    other += value
                break
    return main, other


def count(
    procs: Processes, name: str, argv: list[str], env: dict[str, str], tmp: Path, run: Any
) -> tuple[float, float]:
    """Start ``argv`` under callgrind, let ``run(port, phase)`` drive it; k instructions/request."""
    out = tmp / f"{name}.cg"
    grind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes"]
    proc = procs.spawn(name, [*grind, f"--callgrind-out-file={out}", *argv], env=env)
    port = procs.port(name, 600)
    n = run(port, "warm")
    time.sleep(1)
    control = ["callgrind_control"]
    subprocess.run([*control, "-i", "on", str(proc.pid)], check=True, capture_output=True)
    n = run(port, "count")
    time.sleep(3)  # the metering loader's next batch: part of these requests' cost
    subprocess.run([*control, "-i", "off", str(proc.pid)], check=True, capture_output=True)
    subprocess.run([*control, "-d", str(proc.pid)], check=True, capture_output=True)
    time.sleep(0.5)
    proc.stop(timeout=60)
    main, other = _totals(out)
    return main / n / 1000, other / n / 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--policy", type=Path, default=ROOT / "policies.yaml")
    parser.add_argument("--hit", action="store_true", help="also count cache hits")
    parser.add_argument(
        "--stream", action="store_true", help="streamed chat completions instead of plain ones"
    )
    parser.add_argument(
        "--prefix",
        type=int,
        action="append",
        help="only these chain prefixes (item counts; repeatable; default: every prefix)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "instructions.md", help="report file"
    )
    args = parser.parse_args(argv)
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="tollway-instr-"))
    procs = Processes()
    py = sys.executable
    rows: list[tuple[str, float, float]] = []
    try:
        _, emu_port = procs.start("emulator", [*TOLLWAY, "emulator", "--port", "0"])
        emu = f"http://127.0.0.1:{emu_port}"
        base, _, env_names = bench_policy(args.policy, emu)
        env = dict(os.environ) | {n: "bench" for n in env_names}
        env["TOLLWAY_ADMIN_KEY"] = "bench-admin"
        key = create_bench_key(TOLLWAY, tmp / "keys", base, env)

        def driver(path: str, hit: bool = False, ready: bool = True) -> Any:
            def run(port: int, phase: str) -> int:
                url = f"http://127.0.0.1:{port}"
                if ready:
                    wait_ready(f"{url}/readyz", 300)
                n = 200 if phase == "warm" else args.requests
                asyncio.run(send(url + path, key, n, phase, hit, args.stream))
                return n

            return run

        chat = "/v1/chat/completions"
        bare = [py, str(ROOT / "bench" / "bare_proxy.py"), "--upstream", emu]
        direct = driver(chat, ready=False)
        rows.append(("bare proxy", *count(procs, "bare", bare, env, tmp, direct)))
        emulator = [*TOLLWAY, "emulator", "--port", "0"]
        rows.append(
            ("emulator, answering directly", *count(procs, "emu", emulator, env, tmp, direct))
        )
        items = len(base.get("chain") or [])
        prefixes = range(items + 1) if args.prefix is None else sorted(set(args.prefix))
        runs = [(n, False) for n in prefixes] + ([(items, True)] if args.hit else [])
        for n, hit in runs:
            folder = tmp / f"gw{n}{'-hit' if hit else ''}"
            path, names, _ = write_variant(base, n, folder, tmp / "keys" / "keys.json")
            serve = [*TOLLWAY, "serve", "--policy", str(path), "--port", "0"]
            label = f"gateway, chain: {chain_label(names)}" + (", cache hits" if hit else "")
            print(f"  {label} ...", file=sys.stderr, flush=True)
            rows.append((label, *count(procs, folder.name, serve, env, tmp, driver(chat, hit))))
    except BenchError as e:
        print(f"failed: {e}", file=sys.stderr)
        return 2
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        "# Instructions per request (callgrind)",
        "",
        f"`bench/instructions.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"tollway {git_revision()}, {args.requests} requests per server (4 concurrent, each "
        f"distinct unless a cache hit){', streamed' if args.stream else ''}, after 200 "
        "warm-up requests. Thousands of instructions "
        "per request; *added* is the step from the row above. Deterministic to ~0.1 % between "
        "runs; kernel time, cache misses and waiting are not in it (see the script's docstring).",
        "",
        "| server | event-loop thread (k) | added | other threads (k) |",
        "|---|---:|---:|---:|",
    ]
    prev: float | None = None
    for label, main_k, other_k in rows:
        gateway_step = label.startswith("gateway") and "hits" not in label
        step = f"{main_k - prev:+.0f}" if prev is not None and gateway_step else ""
        lines.append(f"| {label} | {main_k:.0f} | {step} | {other_k:.0f} |")
        if label == "bare proxy" or (label.startswith("gateway") and "hits" not in label):
            prev = main_k
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
