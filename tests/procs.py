"""Run the real `tollway` command as subprocesses (serve, emulator, demo) for end-to-end tests,
talk to them (a small HTTP client), and start the redis-server they may need."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOLLWAY = [sys.executable, "-m", "proxy.cli"]


class Proc:
    """A child process whose output lines are collected by a reader thread."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.popen = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.popen.poll() is not None:
                    break
                continue
            m = rx.search(line)
            if m:
                return m
        raise AssertionError(f"{pattern!r} not printed; output:\n{''.join(self.output)}")

    def text(self) -> str:
        return "".join(self.output)

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.reader.join(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        return self.popen.returncode


@contextmanager
def running(args: list[str], ready: str, env: dict[str, str] | None = None) -> Iterator[Proc]:
    proc = Proc(args, env)
    try:
        proc.wait_for(ready)
        yield proc
    finally:
        proc.stop()


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


def reachable(port: int) -> bool:
    """Whether something accepts connections on ``127.0.0.1:port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start_redis(binary: str, port: int, *, daemonize: bool = False) -> subprocess.Popen[bytes]:
    """Start a redis-server without persistence on ``port``; return once it answers.

    ``daemonize``: it outlives the test run (the session's shared server, stopped at its end
    with ``redis-cli shutdown``); else it is this Popen's child, to kill and start again.
    """
    no_persistence = ["--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", *no_persistence]
        + (["--daemonize", "yes"] if daemonize else []),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if daemonize:  # the parent returns once the daemon forked
        assert proc.wait(10) == 0, f"redis-server --daemonize on :{port} failed"
    for _ in range(250):
        if reachable(port):
            return proc
        time.sleep(0.02)
    raise AssertionError(f"started redis-server on :{port} but it does not answer")
