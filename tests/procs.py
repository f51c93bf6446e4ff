"""Run the real `tollway` command as subprocesses (serve, emulator, demo) for end-to-end tests,
talk to them (a small HTTP client), start the redis-server they may need, and wait for a
condition (never for a fixed time)."""

from __future__ import annotations

import asyncio
import http.client
import inspect
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis

# The one helper that runs a child process, shared with the benchmark.
from bench.procs import ROOT, TOLLWAY
from bench.procs import NotPrinted as NotPrinted
from bench.procs import Proc as Proc
from bench.procs import running as running

POLL = 0.01  # seconds between two looks at a condition a test waits for
What = str | Callable[[], str]  # what a wait was for: text, or a function giving it


def fresh_interpreter(script: str) -> str:
    """Run ``script`` in a new Python at the project root (nothing imported yet); its stdout.

    For what the test process cannot show: which modules a fresh import pulls in.
    """
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


async def run_tollway(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """The real ``tollway`` command (exit code, output), without blocking the event loop an
    in-process gateway of the same test serves on."""
    proc = await asyncio.create_subprocess_exec(
        *TOLLWAY,
        *args,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


class Http:
    """A tiny keep-alive HTTP client on the standard library (one connection, reopened on error)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def post(
        self, path: str, body: bytes, headers: dict[str, str | bytes]
    ) -> tuple[int, dict[str, str], bytes]:
        return self.request("POST", path, body, headers)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str | bytes] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """Header values may be bytes: they are sent as they are (any byte but CR and LF)."""
        try:
            self.conn.request(method, path, body=body, headers=headers or {})
            r = self.conn.getresponse()
            data = r.read()
        except (http.client.HTTPException, ConnectionError):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            raise
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data

    def create_key(self, admin_key: str, user: str, tier: str) -> str:
        """Issue a key through the admin API (``POST /admin/keys``); the key."""
        status, _, made = self.post(
            "/admin/keys",
            json.dumps({"user": user, "tier": tier}).encode(),
            {"Authorization": f"Bearer {admin_key}", "Content-Type": "application/json"},
        )
        assert status == 201, made
        return str(json.loads(made)["key"])

    def close(self) -> None:
        self.conn.close()


def wait_for(predicate: Callable[[], object], timeout: float = 5.0, what: What = "") -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``timeout`` seconds
    (a callable ``what`` is asked then: a process's output so far).

    Tests wait for a state (a request in flight, a row written, a port open), never for an
    amount of time: on a busy machine a fixed sleep is either too short (a flaky test) or
    wasted. The poll is short, so a test goes on as soon as the state is there.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {_told(what) or predicate}")
        time.sleep(POLL)


async def until(
    predicate: Callable[[], object | Awaitable[object]], within: float = 5.0, what: What = ""
) -> None:
    """:func:`wait_for` inside the event loop: ``predicate`` may be a coroutine function, and
    the loop keeps serving the in-process gateways while the test waits."""
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {_told(what) or predicate}")
        await asyncio.sleep(POLL)


def _told(what: What) -> str:
    return what() if callable(what) else what


def reachable(port: int) -> bool:
    """Whether something accepts connections on ``127.0.0.1:port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start_redis(binary: str, port: int) -> subprocess.Popen[bytes]:
    """Start a redis-server without persistence on ``port``; return once it answers.

    It is this Popen's child (to stop, or kill and start again empty), and the one answering
    is checked to be it: a server someone else runs on that port is never talked to.
    """
    no_persistence = ["--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", *no_persistence],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"redis-server on :{port} exited ({proc.returncode})")
        return reachable(port)

    try:
        wait_for(answers, 5.0, f"redis-server on :{port} answering")
        with redis.Redis(port=port, socket_timeout=5) as client:
            pid = client.info("server")["process_id"]
        assert pid == proc.pid, f":{port} is answered by another redis-server (pid {pid})"
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def stop_redis(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server :func:`start_redis` started (SIGTERM; it has nothing to save)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve_once(policy: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`tollway serve` with a policy that is expected to stop it at start-up (its output)."""
    return subprocess.run(
        [*TOLLWAY, "serve", "--policy", str(policy)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )
