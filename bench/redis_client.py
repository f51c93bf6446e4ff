"""What one admission costs the gateway's process in each Redis client, and redis-server.

The limits plugin's admission on Redis is one EVALSHA per request (``plugins.limits.windows``).
This times that call alone, in one process on uvloop (as ``tollway serve`` runs), against a
redis-server of the run: the six layers of the bench policy's enterprise key (sliding-window
counters: the bench raises every limit above ``exact_up_to``), 1 caller at a time and 32
concurrent callers, through

- redis-py's asyncio client with its pure-Python parser (what the gateway used before),
- redis-py with the hiredis parser,
- ``proxy.resp.RespLink`` (hiredis, one pipelined connection): what ``RedisWindows`` uses.

CPU µs per call is this process's CPU time (``time.process_time``) over the calls; the
redis-server's is its ``/proc`` CPU over the same calls. Run by ``bench/instances.py`` (its
report's "client" table) or alone: ``.venv/bin/python bench/redis_client.py``.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the harness is imported as the `bench` package
    sys.path.insert(0, str(ROOT))

from bench.policy import HUGE  # noqa: E402
from bench.procfs import cpu_seconds  # noqa: E402

CALLS = 6000
LAYERS: list[tuple[int, float, tuple[str, ...]]] = [
    (HUGE, 60.0, ("ip", "127.0.0.1")),
    (HUGE, 3600.0, ("ip", "127.0.0.1")),
    (HUGE, 60.0, ("user", "bench")),
    (HUGE, 3600.0, ("user", "bench")),
    (HUGE, 86400.0, ("user", "bench")),
    (HUGE, 60.0, ("plan", "bench")),
]


def _redis_py(url: str, parser: str) -> tuple[Callable[[], Awaitable[Any]], Callable[[], Any]]:
    """An admission through redis-py's ``register_script`` (EVALSHA), as before ``RespLink``."""
    import redis.asyncio as aioredis
    from redis import _parsers  # the parser is chosen by class: private, bench only

    from plugins.limits.windows import _ADMIT_SCRIPT

    parser_class = (
        _parsers._AsyncHiredisParser if parser == "hiredis" else _parsers._AsyncRESP2Parser
    )
    client = aioredis.from_url(url, parser_class=parser_class)
    script = client.register_script(_ADMIT_SCRIPT)
    keys: list[bytes] = []  # the keys and arguments RedisWindows sends (counters, server clock)
    args: list[bytes] = []
    for amount, period, ids in LAYERS:
        keys.append(f"tollway:rl:cnt:{amount}/{period:g}:{':'.join(ids)}".encode())
        args += (str(amount).encode(), str(round(period * 1e6)).encode(), b"0")

    async def call() -> Any:
        return await script(keys=keys, args=[b"", b"", b"", b"", b"", *args])

    return call, client.aclose


def _resp(url: str) -> tuple[Callable[[], Awaitable[Any]], Callable[[], Any]]:
    from plugins.limits.windows import BoundLayers, RedisWindows

    windows = RedisWindows(url)
    bound = BoundLayers(LAYERS)

    async def call() -> Any:
        return await windows.admit(bound)

    return call, windows.close


async def _time(
    make: Callable[[], tuple[Callable[[], Awaitable[Any]], Callable[[], Any]]],
    concurrency: int,
    redis_pid: int,
) -> dict[str, float]:
    call, close = make()
    try:
        for _ in range(200):  # connect, load the script, warm up
            await call()

        async def caller(n: int) -> None:
            for _ in range(n):
                await call()

        cpu0, redis0, t0 = time.process_time(), cpu_seconds(redis_pid), time.perf_counter()
        await asyncio.gather(*(caller(CALLS // concurrency) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        cpu, redis_cpu = time.process_time() - cpu0, cpu_seconds(redis_pid) - redis0
    finally:
        await close()
    calls = CALLS // concurrency * concurrency
    return {
        "client_cpu_us": cpu / calls * 1e6,
        "redis_cpu_us": redis_cpu / calls * 1e6,
        "calls_per_s": calls / wall,
    }


CLIENTS: dict[str, Callable[[str], tuple[Callable[[], Awaitable[Any]], Callable[[], Any]]]] = {
    "redis-py, Python parser": lambda url: _redis_py(url, "python"),
    "redis-py, hiredis parser": lambda url: _redis_py(url, "hiredis"),
    "proxy.resp (pipelined, hiredis)": _resp,
}


def measure_clients(url: str, redis_pid: int, rounds: int = 3) -> list[dict[str, Any]]:
    """Per client and concurrency: the best of ``rounds`` alternating rounds (interference
    on a shared machine only ever adds CPU time)."""
    import uvloop

    out: dict[tuple[str, int], list[dict[str, float]]] = {}
    for _ in range(rounds):
        for name, make in CLIENTS.items():
            for concurrency in (1, 32):
                result = uvloop.run(_time(functools.partial(make, url), concurrency, redis_pid))
                out.setdefault((name, concurrency), []).append(result)
    return [
        {
            "client": name,
            "concurrency": concurrency,
            **{k: min(r[k] for r in runs) for k in ("client_cpu_us", "redis_cpu_us")},
            "calls_per_s": max(r["calls_per_s"] for r in runs),
        }
        for (name, concurrency), runs in out.items()
    ]


def render_clients(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| client | callers | client CPU µs / call | redis-server CPU µs / call | calls/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['client']} | {r['concurrency']} | {r['client_cpu_us']:.1f} | "
            f"{r['redis_cpu_us']:.1f} | {r['calls_per_s']:,.0f} |"
        )
    return lines


def main() -> int:
    from bench.fleet import start_redis
    from bench.procs import Processes

    procs = Processes()
    try:
        port, pid = start_redis(procs)
        rows = measure_clients(f"redis://127.0.0.1:{port}/0", pid)
    finally:
        procs.stop_all()
    print("\n".join(render_clients(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
