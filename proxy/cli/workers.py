"""``tollway serve --workers N``: one machine's cores, N gateway processes on one port.

The parent binds nothing that serves and runs no plugin: it checks that the policy can be
served by several processes, holds ``state.dir``, and starts N fresh interpreters (no fork:
nothing of the parent's threads or locks is inherited) that each bind the same host and port
with ``SO_REUSEPORT``, so the kernel spreads new connections over them. It prints the one
``tollway listening`` line once every worker printed its own, forwards ``SIGHUP`` (reload)
and ``SIGTERM``/``SIGINT`` (graceful stop: each worker gives in-flight requests
``listen.shutdown_timeout``) to every worker, starts a worker again when it dies unexpectedly
(after a backoff that grows while it keeps dying), and exits once every worker exited.

What several processes must share lives in Redis (``state.url``: keys, limits, quotas, cache,
coalescing) and usage goes to its stream (``metering.sink: redis``, loaded by ``tollway
meter``); with memory state or a DuckDB sink each worker would count and store alone, so the
parent refuses to start instead. Worker K keeps its embedded files under
``state.dir/worker-K`` (``proxy.policy.WORKER_STATE_DIR``): one writer per file, and a stable
instance id per worker across restarts. The metering spool may be shared: a killed worker's
segments are adopted by a sibling or by its successor (``plugins.metering.spool``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from proxy.policy import LoadedPolicy

RESTART_MIN = 0.5
"""Seconds before a dead worker is started again; doubled while it keeps dying..."""
RESTART_MAX = 10.0
"""...up to this."""
STEADY = 10.0
"""A worker that ran this long before dying is restarted after RESTART_MIN again."""
READY = "tollway listening on "


def refusal(loaded: LoadedPolicy, workers: int) -> str | None:
    """Why this policy cannot be served by ``workers`` processes (one line), or None."""
    if workers < 1:
        return "--workers must be at least 1"
    if workers == 1:
        return None
    if not loaded.policy.state.distributed:
        return (
            f"--workers {workers} needs shared state: set state.url: redis://HOST:PORT/DB in "
            "the policy (with memory state each worker would keep its own keys, limits, "
            "quotas and cache)"
        )
    for _, item in loaded.chain_items():
        if item.enabled and item.name == "metering" and item.config.get("sink") != "redis":
            return (
                f"--workers {workers} with metering needs metering.sink: redis (and `tollway "
                "meter` to load the usage): one DuckDB file cannot have several writers"
            )
    return None


def seed_state_dirs(folder: str | None, workers: int) -> None:
    """Give each worker's folder a copy of ``keys.json`` when it has none yet.

    Keys issued while the gateway ran as one process are kept in ``state.dir/keys.json``;
    each worker keeps its own copy under ``worker-K`` (Redis holds the shared one and every
    worker merges both ways), so a Redis that restarted empty is seeded with them again.
    """
    if folder is None:
        return
    keys = Path(folder) / "keys.json"
    for k in range(workers):
        own = Path(folder) / f"worker-{k}"
        own.mkdir(parents=True, exist_ok=True)
        if keys.exists() and not (own / "keys.json").exists():
            shutil.copy2(keys, own / "keys.json")


def reserve_port(host: str) -> socket.socket:
    """A free port for ``--port 0``, held (bound, never listening) with SO_REUSEPORT so the
    workers can bind it and no other program takes it meanwhile."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock


def _status(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"status {code}"


class Supervisor:
    """The parent: N worker slots, each kept running until the stop."""

    def __init__(self, policy: str, host: str, port: int, workers: int, grace: float) -> None:
        self.policy = policy
        self.host = host
        self.port = port
        self.workers = workers
        self.grace = grace  # how long stopping workers get before they are killed
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.ready: set[int] = set()
        self.started = False  # every worker was ready once
        self.changed = asyncio.Event()  # a worker became ready, or failed to start
        self.failed = False
        self.stop = asyncio.Event()

    def argv(self, k: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "proxy.cli",
            "serve",
            "--policy",
            self.policy,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--worker-of",
            str(os.getpid()),
            "--worker",
            str(k),
        ]

    async def _pump(self, k: int, proc: asyncio.subprocess.Process) -> None:
        """Copy a worker's output to ours, keeping its ready line for the supervisor."""
        assert proc.stdout is not None
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # a line longer than the reader's limit: asyncio dropped it
                continue
            if not raw:
                return
            line = raw.decode(errors="replace")
            if line.startswith(READY) and k not in self.ready:
                self.ready.add(k)
                self.changed.set()
                if self.started:
                    print(f"tollway: worker {k} (pid {proc.pid}) is serving again", flush=True)
                continue
            sys.stdout.write(line)
            sys.stdout.flush()

    async def keep(self, k: int) -> None:
        """Run worker ``k``; start it again whenever it dies before the stop."""
        backoff = RESTART_MIN
        while not self.stop.is_set():
            proc = await asyncio.create_subprocess_exec(
                *self.argv(k),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                limit=1 << 20,
            )
            self.procs[k] = proc
            began = time.monotonic()
            pump = asyncio.create_task(self._pump(k, proc))
            code = await proc.wait()
            await pump
            del self.procs[k]
            self.ready.discard(k)
            if self.stop.is_set():
                return
            if not self.started:  # a worker that cannot start (a taken port): nor can the rest
                self.failed = True
                self.changed.set()
                return
            if time.monotonic() - began >= STEADY:
                backoff = RESTART_MIN
            print(
                f"tollway: worker {k} (pid {proc.pid}) exited with {_status(code)}; "
                f"starting it again in {backoff:g}s",
                file=sys.stderr,
                flush=True,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), backoff)
            backoff = min(backoff * 2, RESTART_MAX)

    def halt(self) -> None:
        self.stop.set()
        self.changed.set()

    def signal_all(self, sig: int) -> None:
        for proc in list(self.procs.values()):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.halt)
        loop.add_signal_handler(signal.SIGINT, self.halt)
        loop.add_signal_handler(signal.SIGHUP, self.signal_all, signal.SIGHUP)
        slots = [asyncio.create_task(self.keep(k)) for k in range(self.workers)]
        while len(self.ready) < self.workers and not self.failed and not self.stop.is_set():
            self.changed.clear()
            await self.changed.wait()
        if self.failed:
            self.stop.set()
        else:
            self.started = True
            print(
                f"tollway listening on http://{self.host}:{self.port}",
                flush=True,
            )
        await self.stop.wait()
        self.signal_all(signal.SIGTERM)
        _, pending = await asyncio.wait(slots, timeout=self.grace)
        if pending:
            print(
                "tollway: workers still running after the shutdown; killing them", file=sys.stderr
            )
            self.signal_all(signal.SIGKILL)
            await asyncio.wait(pending)
        return 1 if self.failed else 0


def serve_workers(loaded: LoadedPolicy, policy: str, host: str, port: int, workers: int) -> int:
    """Run ``workers`` gateway processes on ``host:port`` until SIGTERM/SIGINT."""
    seed_state_dirs(loaded.policy.state.dir, workers)
    held = reserve_port(host) if port == 0 else None
    if held is not None:
        port = held.getsockname()[1]
    # a worker gets shutdown_timeout for requests and as long again for its plugins
    # (proxy.cli.serve._exit_if_stuck); a little more covers its start-up and exit
    grace = 2 * loaded.policy.listen.shutdown_timeout + 5.0
    try:
        return asyncio.run(Supervisor(policy, host, port, workers, grace).run())
    finally:
        if held is not None:
            held.close()


def become_worker(parent: int) -> None:
    """In a worker: end with the parent (``PR_SET_PDEATHSIG``: SIGTERM when it dies, even by
    SIGKILL), so a killed parent never leaves workers serving unsupervised."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG; Linux only
    if os.getppid() != parent:  # the parent died before the request took effect
        raise SystemExit(1)
