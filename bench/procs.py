"""Child processes: the one helper that starts, watches and stops the servers of the benchmark
and of the end-to-end tests (``tests/procs.py`` re-exports it).

Both need the same things from a server they start: its output collected without ever
blocking it (a pipe nobody drains stops a chatty server), a wait for a line it prints
("listening on http://127.0.0.1:PORT" tells the port a ``--port 0`` server chose), and a stop
that is graceful first (SIGTERM, once) and certain in the end (SIGKILL). Standard library only,
so importing it costs a test run nothing.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOLLWAY = [sys.executable, "-m", "proxy.cli"]
"""The ``tollway`` command of this interpreter, whether or not its script is installed."""

LISTENING = re.compile(r"listening on http://[^\s:]+:(\d+)")
"""The line every server (gateway, emulator, meter, bare proxy) prints once it accepts."""


class BenchError(Exception):
    """A run that cannot produce trustworthy numbers (a process died, requests failed)."""


class NotPrinted(AssertionError):
    """A child process exited or timed out before printing an awaited line.

    An AssertionError, so a test waiting for a server fails as an assertion with the output.
    """


def tollway_command() -> list[str]:
    """The installed ``tollway`` script beside this interpreter (what an operator runs, and
    what the recorded bench numbers were measured with), else ``TOLLWAY``."""
    script = Path(sys.executable).parent / "tollway"
    return [str(script)] if script.exists() else TOLLWAY


class Proc:
    """A child process (started in the project root, ``env`` over this process's environment)
    whose output lines are collected by a reader thread."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.popen = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",  # a stray byte must not kill the reader (and block the child)
            bufsize=1,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self._terminated = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """The first match of ``pattern`` in a line printed since the last ``wait_for``."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.popen.poll() is not None:
                    self.reader.join(5)  # its last lines belong in the message
                    break
                continue
            m = rx.search(line)
            if m:
                return m
        raise NotPrinted(f"{pattern!r} not printed; output:\n{self.text()}")

    def text(self) -> str:
        return "".join(self.output)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(line.rstrip("\n") for line in self.output[-lines:])

    def terminate(self) -> None:
        """SIGTERM, once: a second one could cut a graceful shutdown short."""
        if not self._terminated and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if still running after ``timeout`` s; the exit status."""
        self.terminate()
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self.reader.join(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        return self.popen.returncode


@contextmanager
def running(args: list[str], ready: str, env: dict[str, str] | None = None) -> Iterator[Proc]:
    """A ``Proc`` that has printed ``ready``, stopped when the block ends."""
    proc = Proc(args, env)
    try:
        proc.wait_for(ready)
        yield proc
    finally:
        proc.stop()


class Processes:
    """The servers of one bench run, by name; every one is stopped on exit, also on Ctrl-C or
    an error (the caller's ``finally`` calls ``stop_all``)."""

    def __init__(self) -> None:
        self.procs: dict[str, Proc] = {}

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, timeout: float = 30.0
    ) -> tuple[Proc, int]:
        """Start ``argv`` and wait for its "listening on http://host:PORT" line; return PORT."""
        proc = self.spawn(name, argv, env)
        return proc, self.port(name, timeout)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        """Start ``argv`` without waiting (servers that start in parallel start faster)."""
        proc = Proc(argv, env)
        self.procs[name] = proc
        return proc

    def port(self, name: str, timeout: float = 30.0) -> int:
        """Wait for the "listening on http://host:PORT" line of a spawned server."""
        try:
            m = self.procs[name].wait_for(LISTENING.pattern, timeout)
        except NotPrinted:
            raise BenchError(f"{name} did not start:\n{self.tail(name)}") from None
        return int(m.group(1))

    def tail(self, name: str, lines: int = 30) -> str:
        return self.procs[name].tail(lines)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.popen.poll() is not None:
                raise BenchError(f"{name} exited with {proc.popen.returncode}:\n{proc.tail()}")

    def stop_all(self) -> None:
        """SIGTERM to all at once (they shut down in parallel), then SIGKILL whatever is still
        running 5 s later."""
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            proc.stop(timeout=5)
