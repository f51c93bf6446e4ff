"""Latency of a cache hit through the gateway, against the bare proxy and a direct call.

The product's promise for the cache: a hit answered by Tollway (auth, limits, cache lookup and
decryption, reply) is faster than asking the provider at all. The emulator answers in well
under a millisecond, far faster than any real provider, so the budget is a hit's p50 below the
p50 of the same request through the bare proxy (a pass-through in front of an instant
provider); the direct call is shown too. Runs the shipped chain (``bench_policy``: only
upstream URLs, limits and file locations changed), one key, one repeated request of a cached
feature, sequentially (c=1), alternating rounds. For scale it also times the same request
through ``bench/bare_proxy.py`` (the floor of any Python proxy in front of the emulator) and
misses through the gateway (distinct prompts of the same feature: what a hit saves even
against an upstream that answers at once).

    .venv/bin/python bench/cache_hit.py [--requests 2000]   # writes bench/cache_hit.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the harness is imported as the `bench` package
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench.load import wait_ready  # noqa: E402
from bench.policy import bench_policy, create_bench_key, write_variant  # noqa: E402
from bench.procs import TOLLWAY, Processes  # noqa: E402

BODY = {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "explain this code"}]}


async def timed(
    s: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    n: int,
    expect: str | None,
    unique: bool = False,
) -> list[float]:
    """``n`` sequential requests (ms each); ``expect``: the X-Tollway-Cache every reply has."""
    out = []
    for i in range(n):
        body = BODY
        if unique:
            body = {**BODY, "messages": [{"role": "user", "content": f"explain {time.time()} {i}"}]}
        t0 = time.perf_counter()
        async with s.post(url, json=body, headers=headers) as r:
            await r.read()
            if r.status != 200 or (expect and r.headers.get("X-Tollway-Cache") != expect):
                raise RuntimeError(
                    f"unexpected reply {r.status} {r.headers.get('X-Tollway-Cache')}"
                )
        out.append((time.perf_counter() - t0) * 1000)
    return out


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


async def measure(
    emu: str, bare: str, gw: str, key: str, n: int, rounds: int
) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"direct": [], "bare": [], "hit": [], "miss": []}
    feature = {"Authorization": f"Bearer {key}", "X-Tollway-Feature": "confidence_analysis"}
    anyone = {"Authorization": "Bearer x"}
    chat = "/v1/chat/completions"
    async with aiohttp.ClientSession() as s:
        await timed(s, gw + chat, feature, 1, None)  # the miss that stores the answer
        for url, headers, expect in (
            (emu, anyone, None),
            (bare, anyone, None),
            (gw, feature, "hit"),
        ):
            await timed(s, url + chat, headers, 50, expect)  # warm-up
        for _ in range(rounds):
            k = n // rounds
            results["direct"] += await timed(s, emu + chat, anyone, k, None)
            results["bare"] += await timed(s, bare + chat, anyone, k, None)
            results["hit"] += await timed(s, gw + chat, feature, k, "hit")
            results["miss"] += await timed(s, gw + chat, feature, k // 4, "miss", unique=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tollway-cachehit-"))
    py = sys.executable
    procs = Processes()
    try:
        _, emu_port = procs.start("emulator", [*TOLLWAY, "emulator", "--port", "0"])
        emu_url = f"http://127.0.0.1:{emu_port}"
        policy, _, env_names = bench_policy(ROOT / "policies.yaml", emu_url)
        env = dict(os.environ) | {name: "bench" for name in env_names}
        key = create_bench_key(TOLLWAY, tmp / "keys", policy, env)
        items = len(policy.get("chain") or [])
        path, names, _ = write_variant(policy, items, tmp / "gw", tmp / "keys" / "keys.json")
        serve = [*TOLLWAY, "serve", "--policy", str(path), "--port", "0"]
        _, gw_port = procs.start("gateway", serve, env=env)
        gw_url = f"http://127.0.0.1:{gw_port}"
        wait_ready(f"{gw_url}/readyz")
        bare = [py, str(ROOT / "bench" / "bare_proxy.py"), "--upstream", emu_url, "--port", "0"]
        _, bare_port = procs.start("bare", bare)
        bare_url = f"http://127.0.0.1:{bare_port}"
        res = asyncio.run(measure(emu_url, bare_url, gw_url, key, args.requests, 5))
    finally:
        procs.stop_all()
    b50, h50 = pct(res["bare"], 0.5), pct(res["hit"], 0.5)
    verdict = "PASS" if h50 < b50 else "FAIL"
    chain = ", ".join(names)
    text = (
        "# Cache hit latency\n\n"
        f"`bench/cache_hit.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"chain: {chain}; {len(res['hit'])} sequential requests each (c=1, Python aiohttp "
        "client, 5 alternating rounds), feature `confidence_analysis` (TTL 7d).\n\n"
        "| | p50 (ms) | p90 (ms) | p99 (ms) |\n|---|---:|---:|---:|\n"
        + "".join(
            f"| {label} | {pct(res[k], 0.5):.3f} | {pct(res[k], 0.9):.3f} | "
            f"{pct(res[k], 0.99):.3f} |\n"
            for k, label in (
                ("direct", "direct call to the emulator"),
                ("bare", "the emulator through the bare proxy (for scale)"),
                ("hit", "cache hit through the gateway"),
                ("miss", f"cache miss through the gateway ({len(res['miss'])} distinct prompts)"),
            )
        )
        + "\n"
        f"Target: hit p50 below the bare proxy's p50: **{verdict}**.\n"
    )
    (Path(__file__).parent / "cache_hit.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
