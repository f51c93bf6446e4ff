"""Latency of a cache hit through the gateway, against a direct call to the emulator.

The product's promise for the cache: a hit answered by Tollway (auth, limits, cache lookup and
decryption, reply) is faster than asking the provider at all. The emulator answers in well
under a millisecond, far faster than any real provider, so "below a direct call to the
emulator" is the strictest form of that target. Runs the shipped chain (``bench_policy``: only
upstream URLs, limits and file locations changed), one key, one repeated request of a cached
feature, sequentially (c=1), alternating direct and gateway rounds.

    .venv/bin/python bench/cache_hit.py [--requests 2000]   # writes bench/cache_hit.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import bench_policy

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "bench-cache-admin"
BODY = {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "explain this code"}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def wait_up(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            try:
                async with s.get(url):
                    return
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


async def timed(
    s: aiohttp.ClientSession, url: str, headers: dict[str, str], n: int, expect_hit: bool
) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        async with s.post(url, json=BODY, headers=headers) as r:
            await r.read()
            if r.status != 200 or (expect_hit and r.headers.get("X-Tollway-Cache") != "hit"):
                raise RuntimeError(
                    f"unexpected reply {r.status} {r.headers.get('X-Tollway-Cache')}"
                )
        out.append((time.perf_counter() - t0) * 1000)
    return out


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


async def measure(emu: str, gw: str, key: str, n: int, rounds: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"direct": [], "hit": []}
    feature = {"Authorization": f"Bearer {key}", "X-Tollway-Feature": "confidence_analysis"}
    async with aiohttp.ClientSession() as s:
        await timed(s, f"{gw}/v1/chat/completions", feature, 1, False)  # the miss that stores it
        await timed(s, f"{emu}/v1/chat/completions", {"Authorization": "Bearer x"}, 50, False)
        await timed(s, f"{gw}/v1/chat/completions", feature, 50, True)
        for _ in range(rounds):
            results["direct"] += await timed(
                s, f"{emu}/v1/chat/completions", {"Authorization": "Bearer x"}, n // rounds, False
            )
            results["hit"] += await timed(
                s, f"{gw}/v1/chat/completions", feature, n // rounds, True
            )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tollway-cachehit-"))
    emu_port, gw_port = free_port(), free_port()
    emu_url, gw_url = f"http://127.0.0.1:{emu_port}", f"http://127.0.0.1:{gw_port}"
    policy, _, env_names = bench_policy(ROOT / "policies.yaml", emu_url)
    policy["listen"] = {**policy.get("listen", {}), "port": gw_port}
    policy["state"] = {**policy.get("state", {}), "dir": str(tmp / "state")}
    policy["admin"] = {"key": ADMIN}
    for item in policy.get("chain", []):
        if item.get("name") == "metering":
            item["config"] = {**item.get("config", {}), "database": str(tmp / "usage.duckdb")}
    (tmp / "policy.yaml").write_text(yaml.safe_dump(policy))
    env = {name: "bench" for name in env_names}
    procs = [start([sys.executable, "-m", "proxy.cli", "emulator", "--port", str(emu_port)], env)]
    try:
        procs.append(
            start(
                [sys.executable, "-m", "proxy.cli", "serve", "--policy", str(tmp / "policy.yaml")],
                env,
            )
        )

        async def run() -> dict[str, Any]:
            await wait_up(f"{emu_url}/_emulator/stats")
            await wait_up(f"{gw_url}/healthz")
            async with (
                aiohttp.ClientSession() as s,
                s.post(
                    f"{gw_url}/admin/keys",
                    json={"user": "bench", "tier": "pro"},
                    headers={"Authorization": f"Bearer {ADMIN}"},
                ) as r,
            ):
                key = (await r.json())["key"]
            return await measure(emu_url, gw_url, key, args.requests, 5)

        res = asyncio.run(run())
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait(10)
    d50, h50 = pct(res["direct"], 0.5), pct(res["hit"], 0.5)
    verdict = "PASS" if h50 < d50 else "FAIL"
    chain = ", ".join(i["name"] for i in policy.get("chain", []))
    text = (
        "# Cache hit latency\n\n"
        f"`bench/cache_hit.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"chain: {chain}; {len(res['hit'])} sequential requests each (c=1, Python aiohttp "
        "client, 5 alternating rounds), feature `confidence_analysis` (TTL 7d).\n\n"
        "| | p50 (ms) | p90 (ms) | p99 (ms) |\n|---|---:|---:|---:|\n"
        f"| direct call to the emulator | {d50:.3f} | {pct(res['direct'], 0.9):.3f} | "
        f"{pct(res['direct'], 0.99):.3f} |\n"
        f"| cache hit through the gateway | {h50:.3f} | {pct(res['hit'], 0.9):.3f} | "
        f"{pct(res['hit'], 0.99):.3f} |\n\n"
        f"Target: hit p50 below the direct call's p50: **{verdict}**.\n"
    )
    (Path(__file__).parent / "cache_hit.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
