"""``--profile``: py-spy on the full gateway under c=32 load, aggregated by function.

Only Python stacks are sampled (DuckDB's native threads are invisible to py-spy, which is why
the per-plugin table splits CPU by thread). A gateway function is charged with the library
code it calls directly, so "orjson under the relay" reads as the relay's cost.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.measure import Target
from bench.policy import chain_label
from bench.procs import ROOT, BenchError

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
