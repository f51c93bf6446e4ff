"""Start-up of one run: the emulator, the bare proxy and a gateway per chain prefix, ready.

Every gateway runs a policy generated from the measured one (``bench/policy.py``) that must
pass ``tollway check``; the checks run in parallel (each imports every plugin), and so do the
gateways' start-ups. Idle memory is read here, right after start-up, before any load.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.load import wait_ready, write_lua
from bench.measure import Target, has_usage_db
from bench.policy import bench_policy, chain_label, create_bench_key, write_variant
from bench.procfs import memory_mb
from bench.procs import ROOT, BenchError, Processes, tollway_command


@dataclass(slots=True)
class Fleet:
    """The servers of one run, started and ready, and what the report says about them."""

    direct: Target  # the emulator itself
    bare: Target
    gateway: Target  # the full chain
    prefixes: list[Target]  # one gateway per shorter prefix of the chain (``--no-chains``: none)
    steps: list[tuple[str, str, list[str]]]  # (target, label, chain) for ``chain_costs``
    emulator_pid: int
    chain: list[str]  # the full gateway's chain, as ``tollway check`` names it
    policy: dict[str, Any]  # the bench policy, before a prefix is taken
    changes: list[str]  # every change made to the measured policy, for the report
    key: str  # the bench user's gateway key
    lua: Path  # the wrk script posting distinct requests with that key
    idle: dict[str, dict[str, float]]  # memory right after start-up, per server

    @property
    def pids(self) -> list[int]:
        return [self.emulator_pid, *(t.pid for t in (self.bare, *self.gateways) if t.pid)]

    @property
    def gateways(self) -> list[Target]:
        return [*self.prefixes, self.gateway]


def start_servers(
    procs: Processes, tmp: Path, policy_file: Path, prefix: int | None, chains: bool
) -> Fleet:
    """Start every server of a run in ``procs`` (the caller stops them), files under ``tmp``.

    ``prefix``: measure only the first N items of the chain; ``chains``: also start one
    gateway per shorter prefix, for the per-plugin cost.
    """
    tollway = tollway_command()
    emu_proc, emu_port = procs.start("emulator", [*tollway, "emulator", "--port", "0"])
    emu = f"http://127.0.0.1:{emu_port}"

    base, changes, env_names = bench_policy(policy_file, emu)
    if prefix is not None:
        kept = (base.get("chain") or [])[:prefix]
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
    prefixes = list(range(n_items + 1)) if chains else [n_items]
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
        "bare",
        [sys.executable, str(ROOT / "bench" / "bare_proxy.py"), "--upstream", emu, "--port", "0"],
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
    steps: list[tuple[str, str, list[str]]] = [("bare", "bare proxy", [])] + [
        (name, f"gateway, chain: {chain_label(names)}", names)
        for name, names, _ in gateways.values()
    ]
    return Fleet(
        direct=Target("direct", emu, None),
        bare=Target("bare", f"http://127.0.0.1:{bare_port}", bare_proc.pid),
        gateway=started[n_items],
        prefixes=[t for n, t in started.items() if n != n_items],
        steps=steps,
        emulator_pid=emu_proc.pid,
        chain=chain,
        policy=base,
        changes=changes,
        key=key,
        lua=lua,
        idle=idle,
    )
