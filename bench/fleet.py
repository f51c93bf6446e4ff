"""Start-up of ``bench/instances.py``: a redis-server, the gateways of each comparison and a
``tollway meter``, ready, each side knowing where its load goes and whose CPU it costs.

Every gateway runs the bench policy (``bench/policy.py``); the Redis ones with ``state.url``
on this run's own redis-server (never one it did not start), each comparison in its own
database so they share no key.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.load import CHAT, http, unique_body, wait_ready, write_lua
from bench.measure import Target, has_usage_db
from bench.policy import bench_policy, create_bench_key, write_variant
from bench.procs import BenchError, Processes, tollway_command

SCALE_THREADS = 3  # one wrk thread per instance of the three-instance side
SCALE_CONNS = 48  # 16 per thread


@dataclass(slots=True)
class Side:
    """One side of a comparison: where wrk sends the load, and whose CPU it costs."""

    name: str
    url: str  # the first instance's chat URL (wrk's argument; ``setup()`` may redirect)
    lua: Path
    gateway_pids: Callable[[], list[int]]  # read per round: a restarted worker is new
    usage: list[Target] = field(default_factory=list)  # gateways with a usage database
    roles: dict[str, int] = field(default_factory=dict)  # redis, meter, emulator: pid


@dataclass(slots=True)
class Fleet:
    """Every server of a run, started and answering, as the three comparisons' sides."""

    state: tuple[Side, Side]  # memory, redis
    instances: tuple[Side, Side]  # 1 instance, 3 instances
    workers: tuple[Side, Side]  # --workers 1, --workers 2
    roles: dict[str, int]  # emulator, redis (and meter): pid
    redis_port: int
    chain: list[str]
    policy: dict[str, Any]  # the bench policy
    changes: list[str]  # every change made to the measured policy, for the report
    key: str

    @property
    def sides(self) -> list[Side]:
        return [*self.state, *self.instances, *self.workers]

    @property
    def pids(self) -> list[int]:
        return [*self.roles.values(), *(p for s in self.sides for p in s.gateway_pids())]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (a ``--workers`` parent and its workers)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    out, todo = [pid], [pid]
    while todo:
        kids = [p for p, parent in parents.items() if parent == todo[-1]]
        todo.pop()
        out += kids
        todo += kids
    return out


def _pids(*pids: int) -> Callable[[], list[int]]:
    return lambda: list(pids)


def _tree(pid: int) -> Callable[[], list[int]]:
    return lambda: descendants(pid)


def start_redis(procs: Processes) -> tuple[int, int]:
    """A redis-server of this run on a free port, without persistence: (port, pid).

    Checked to be the one answering (never a server someone else runs on that port)."""
    import redis

    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
    proc = procs.spawn("redis", [*argv, "--save", "", "--appendonly", "no"])
    proc.wait_for("Ready to accept connections", 15)
    with redis.Redis(port=port, socket_timeout=5) as client:
        answering = int(client.info("server")["process_id"])
    if answering != proc.pid:
        raise BenchError(f"127.0.0.1:{port} is answered by another redis-server")
    return port, proc.pid


def redis_version(port: int) -> str:
    import redis

    with redis.Redis(port=port, socket_timeout=5) as client:
        return str(client.info("server")["redis_version"])


def on_redis(
    policy: dict[str, Any], redis_url: str, changes: list[str] | None = None
) -> dict[str, Any]:
    """The policy with ``state.url`` on Redis. A chain item whose plugin's config has a
    ``key`` (an encryption key every instance must share: the cache's, the stored
    responses') and sets none gets a random one (a new key each run): shared state refuses
    to start without it, and a per-process key would be what it guards against."""
    from proxy.chain import resolve_factory

    out = copy.deepcopy(policy)
    out["state"] = {**(out.get("state") or {}), "url": redis_url}
    for i, item in enumerate(out.get("chain") or []):
        config = item.get("config") or {}
        model = getattr(resolve_factory(str(item.get("name"))), "Config", None)
        if "key" in getattr(model, "model_fields", {}) and "key" not in config:
            item["config"] = {**config, "key": secrets.token_hex(32)}
            if changes is not None:
                changes.append(f"chain[{i}] ({item.get('name')}).config.key: a random key")
    return out


def shared(policy: dict[str, Any], redis_url: str) -> dict[str, Any]:
    """The policy as several instances run it: state on Redis, usage through its stream."""
    out = on_redis(policy, redis_url)
    for item in out.get("chain") or []:
        if item.get("name") == "metering":
            item["config"] = {**(item.get("config") or {}), "sink": "redis"}
    return out


def multi_lua(path: Path, key: str, bases: list[str]) -> None:
    """The bench's wrk script, whose threads connect round-robin to ``bases`` (thread k to
    instance k mod n): ``setup()`` sets each thread's ``addr`` before it connects."""
    write_lua(path, key)
    hosts = ", ".join(json.dumps(b.removeprefix("http://")) for b in bases)
    path.write_text(
        path.read_text()
        + f"""
-- several instances: thread k connects to instance k mod n (an L4 balancer, no extra hop)
local instances = {{{hosts}}}

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
  local host, port = string.match(instances[(threads - 1) % #instances + 1], "^(.+):(%d+)$")
  thread.addr = wrk.lookup(host, port)[1]
end
"""
    )


def sanity(base: str, key: str) -> None:
    """One request before any load: the side answers (a refused key would fail every run)."""
    body = unique_body(f"sanity-{secrets.token_hex(4)}")
    reply = http("POST", base + CHAT, body, {"Authorization": f"Bearer {key}"})
    if not reply.get("choices"):
        raise BenchError(f"{base}: unexpected reply {reply}")


class _Starter:
    """What every gateway of a run shares: the command, environment and bench key."""

    def __init__(self, procs: Processes, tmp: Path, policy_file: Path) -> None:
        self.procs = procs
        self.tmp = tmp
        self.tollway = tollway_command()
        emu_proc, emu_port = procs.start("emulator", [*self.tollway, "emulator", "--port", "0"])
        self.emulator_pid = emu_proc.pid
        self.base, self.changes, env_names = bench_policy(
            policy_file, f"http://127.0.0.1:{emu_port}"
        )
        self.env = dict(os.environ)
        for name in env_names:  # provider keys etc.: the emulator accepts any
            self.env.setdefault(name, f"bench-{name.lower()}")
        self.admin_key = "admin_" + secrets.token_urlsafe(18)
        self.env["TOLLWAY_ADMIN_KEY"] = self.admin_key
        self.key = create_bench_key(self.tollway, tmp / "keys", self.base, self.env)

    def policy(self, name: str, policy: dict[str, Any]) -> Path:
        """``policy`` written for one server, with its own state and files folder."""
        n_items = len(policy.get("chain") or [])
        return write_variant(policy, n_items, self.tmp / name, self.tmp / "keys" / "keys.json")[0]

    def gateway(self, name: str, policy: Path, *extra: str) -> tuple[str, int]:
        """``tollway serve`` on a free port, ready: (base URL, pid)."""
        argv = [*self.tollway, "serve", "--policy", str(policy), "--host", "127.0.0.1"]
        proc, port = self.procs.start(
            name, [*argv, "--port", "0", *extra], env=self.env, timeout=60
        )
        base = f"http://127.0.0.1:{port}"
        wait_ready(f"{base}/readyz")
        return base, proc.pid


def start_fleet(procs: Processes, tmp: Path, policy_file: Path) -> Fleet:
    """Start every server of the three comparisons in ``procs`` (the caller stops them)."""
    s = _Starter(procs, tmp, policy_file)
    redis_port, redis_pid = start_redis(procs)
    roles = {"emulator": s.emulator_pid, "redis": redis_pid}
    chat = tmp / "chat.lua"
    write_lua(chat, s.key)

    # 1. state: memory:// vs redis:// (db 0), everything else as shipped
    redis_state = on_redis(s.base, f"redis://127.0.0.1:{redis_port}/0", s.changes)
    state = []
    for name, policy in (("memory", s.base), ("redis", redis_state)):
        url, pid = s.gateway(f"gateway-{name}", s.policy(f"state-{name}", policy))
        usage = [Target(name, url, pid, s.admin_key)] if has_usage_db(url, s.admin_key) else []
        state.append(Side(name, url + CHAT, chat, _pids(pid), usage, roles))

    # 2. and 3.: as several instances run (db 1, sink redis, one meter for both)
    several = shared(s.base, f"redis://127.0.0.1:{redis_port}/1")
    meter = [*s.tollway, "meter", "--policy", str(s.policy("meter", several)), "--port", "0"]
    meter_proc, _ = procs.start("meter", meter, env=s.env)
    scale_roles = roles | {"meter": meter_proc.pid}
    # four processes: the one-instance side is not one of the three (no side warms the other)
    one, *three = [s.gateway(f"instance-{k}", s.policy(f"instance-{k}", several)) for k in range(4)]
    multi_lua(tmp / "one.lua", s.key, [one[0]] * SCALE_THREADS)
    multi_lua(tmp / "three.lua", s.key, [url for url, _ in three])
    instances = (
        Side("1 instance", one[0] + CHAT, tmp / "one.lua", _pids(one[1]), roles=scale_roles),
        Side(
            "3 instances",
            three[0][0] + CHAT,
            tmp / "three.lua",
            _pids(*(pid for _, pid in three)),
            roles=scale_roles,
        ),
    )
    workers = []
    for n in (1, 2):
        path = s.policy(f"workers-{n}", several)
        url, pid = s.gateway(f"workers-{n}", path, "--workers", str(n))
        workers.append(Side(f"--workers {n}", url + CHAT, chat, _tree(pid), roles=scale_roles))
    return Fleet(
        state=(state[0], state[1]),
        instances=instances,
        workers=(workers[0], workers[1]),
        roles=roles,
        redis_port=redis_port,
        chain=[str(item.get("name")) for item in s.base.get("chain") or []],
        policy=s.base,
        changes=s.changes,
        key=s.key,
    )
