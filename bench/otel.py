"""The otel plugin's cost: CPU per request of the shipped chain, with and without tracing.

Three gateways run the shipped chain (``bench_policy``: only upstream URLs, limits and file
locations changed); the second has the otel plugin added after ``privacy`` (where the docs
place it) with ``sample_ratio: 1``, exporting over OTLP/HTTP to a receiver in this process that
decodes every export (so the spans are really built, encoded and sent, and counted); the third
the same plugin with ``sample_ratio: 0`` (every trace unsampled: propagated, not recorded).
Rounds of c=32 wrk load alternate the gateways (a noisy neighbour hits all alike); each round
reads each gateway's CPU from ``/proc``: its main thread (the event loop: what a request waits
for) and the whole process (with the exporter's thread). An increment is the median of the
per-round differences against the chain without otel.

    .venv/bin/python bench/otel.py [--rounds 6] [--seconds 5]   # writes bench/results-otel.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the harness is imported as the `bench` package
    sys.path.insert(0, str(ROOT))

from bench.load import run_wrk, wait_ready, write_lua  # noqa: E402
from bench.policy import bench_policy, create_bench_key, write_variant  # noqa: E402
from bench.procfs import cpu_seconds, machine, settle  # noqa: E402
from bench.procs import Processes, tollway_command  # noqa: E402

TRACED = "chain + otel"
UNSAMPLED = "chain + otel, sample_ratio 0"
SCHEDULE_DELAY = 0.5
"""The exporter's interval in the bench: short, so a round's spans are exported (and their
CPU counted) before the round's CPU is read."""


class Receiver:
    """An OTLP/HTTP traces endpoint that decodes each export and counts its spans."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.spans = 0
        self.exports = 0
        ok = ExportTraceServiceResponse().SerializeToString()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                export = ExportTraceServiceRequest.FromString(body)
                receiver.exports += 1
                receiver.spans += sum(
                    len(ss.spans) for rs in export.resource_spans for ss in rs.scope_spans
                )
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(ok)))
                self.end_headers()
                self.wfile.write(ok)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/traces"


def round_cpu(pid: int, url: str, lua: Path, seconds: int) -> dict[str, float]:
    """One c=32 wrk run: requests and the gateway's CPU (main thread, whole process)."""
    main0, all0 = cpu_seconds(pid, main_thread=True), cpu_seconds(pid)
    result = run_wrk(url, lua, 2, 32, seconds)
    time.sleep(SCHEDULE_DELAY + 0.2)  # the round's last spans are exported in it
    settle(pid)
    n = result["requests"]
    return {
        "requests": n,
        "rps": result["rps"],
        "main_us": (cpu_seconds(pid, main_thread=True) - main0) / n * 1e6,
        "all_us": (cpu_seconds(pid) - all0) / n * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results-otel.md")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tollway-otel-"))
    tollway = tollway_command()
    receiver = Receiver()
    procs = Processes()
    try:
        _, emu_port = procs.start("emulator", [*tollway, "emulator", "--port", "0"])
        policy, _, env_names = bench_policy(ROOT / "policies.yaml", f"http://127.0.0.1:{emu_port}")
        env = dict(os.environ) | {name: "bench" for name in env_names}
        key = create_bench_key(tollway, tmp / "keys", policy, env)
        items = list(policy.get("chain") or [])
        at = next((i + 1 for i, it in enumerate(items) if it.get("name") == "privacy"), 1)

        def with_otel(ratio: float) -> dict[str, Any]:
            config = {"endpoint": receiver.url, "sample_ratio": ratio}
            otel = {"name": "otel", "config": {**config, "schedule_delay": SCHEDULE_DELAY}}
            return {**policy, "chain": [*items[:at], otel, *items[at:]]}

        traced, unsampled = with_otel(1.0), with_otel(0.0)
        targets: dict[str, tuple[int, str]] = {}
        chains: dict[str, list[str]] = {}
        gateways = (("chain", policy), (TRACED, traced), (UNSAMPLED, unsampled))
        for name, pol in gateways:
            n = len(pol["chain"])
            folder = tmp / f"gw{len(targets)}"
            path, chains[name], _ = write_variant(pol, n, folder, tmp / "keys" / "keys.json")
            serve = [*tollway, "serve", "--policy", str(path), "--port", "0"]
            proc, port = procs.start(name, serve, env=env)
            base = f"http://127.0.0.1:{port}"
            wait_ready(f"{base}/readyz")
            targets[name] = (proc.pid, base + "/v1/chat/completions")
        lua = tmp / "chat.lua"
        write_lua(lua, key)
        for _pid, url in targets.values():  # warm pools, caches and the allocator
            run_wrk(url, lua, 2, 32, 2)
        settle(targets[TRACED][0])
        spans0 = receiver.spans
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        for k in range(args.rounds):
            names = list(targets)
            order = names[k % len(names) :] + names[: k % len(names)]  # each starts a round
            for name in order:
                pid, url = targets[name]
                rounds[name].append(round_cpu(pid, url, lua, args.seconds))
            print(f"  round {k + 1}/{args.rounds}", file=sys.stderr, flush=True)
        traced_requests = sum(r["requests"] for r in rounds[TRACED])
        spans = receiver.spans - spans0
    finally:
        procs.stop_all()
        receiver.server.shutdown()

    def med(name: str, field: str) -> float:
        return statistics.median(r[field] for r in rounds[name])

    def diff(name: str, field: str) -> float:
        pairs = zip(rounds[name], rounds["chain"], strict=True)
        return statistics.median(a[field] - b[field] for a, b in pairs)

    rows = [
        f"| {name} | {med(name, 'main_us'):.1f} | {med(name, 'all_us'):.1f} | "
        f"{med(name, 'rps'):.0f} |"
        for name in targets
    ]
    base_main, base_all = med("chain", "main_us"), med("chain", "all_us")
    added = [
        f"- {what}: **{diff(name, 'main_us'):.1f} µs** on the event loop "
        f"({diff(name, 'main_us') / base_main:.1%} of the chain's), "
        f"**{diff(name, 'all_us'):.1f} µs** for the whole process "
        f"({diff(name, 'all_us') / base_all:.1%})"
        for name, what in ((TRACED, "sampled"), (UNSAMPLED, "unsampled"))
    ]
    m = machine()
    text = (
        "# The otel plugin's cost per request\n\n"
        f"`bench/otel.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{m['nproc']} CPUs ({m['cpu']}), Python {sys.version.split()[0]}. "
        f"{args.rounds} rounds of {args.seconds} s at c=32 (wrk, small non-streamed chat "
        "completions, every prompt distinct), the gateways alternating in each round.\n\n"
        f"- chain: {', '.join(chains['chain'])}\n"
        f"- {TRACED}: {', '.join(chains[TRACED])} (`schedule_delay: {SCHEDULE_DELAY}`, "
        "OTLP/HTTP to a receiver that decodes every export)\n"
        f"- {UNSAMPLED}: the same, every trace unsampled (propagated, nothing recorded)\n\n"
        "Medians of the rounds, CPU µs per request of the gateway process:\n\n"
        "| gateway | event loop (main thread) | whole process | requests/s |\n"
        "|---|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        "otel adds per request (medians of the per-round differences):\n\n"
        + "\n".join(added)
        + "\n\n"
        f"Spans received: {spans / traced_requests:.2f} per sampled request "
        "(2 expected: the request and its provider call; wrk does not count the requests in "
        "flight when a round stops, so slightly more).\n"
    )
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
