"""The durable queue of one instance: an append-only file of JSON lines under ``state.dir``.

Three kinds of line, each a whole record:

* ``{"q": KEY, "ep": ENDPOINT, "event": {...}, "at": T}``: a delivery is owed (queued);
* ``{"d": KEY, "r": "delivered" | "failed" | "duplicate", "at": T}``: it is settled;
* nothing else. ``KEY`` is ``<event id>/<endpoint key>``, the event id a digest of the event's
  ``dedupe``, so the same occurrence noticed twice has the same key.

Replaying the file gives the deliveries still owed (queued, not settled) and the keys already
settled, which is what makes a delivery happen once per event: an event whose key is known is
not queued again, whether it comes back after a restart (the file) or from another instance
(Redis claims, ``plugins.webhooks.claims``). Lines are written in batches, each batch followed
by one ``fsync`` before the deliveries it queued are attempted, so a queued delivery survives a
crash; a line torn by a crash mid-write is skipped at replay. When most of the file is settled
history the file is rewritten with only what is live (settled keys younger than
``keep_delivered``, and what is owed), via a temporary file and an atomic rename.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("tollway.webhooks")

COMPACT_MIN_LINES = 1000
"""The file is rewritten once it holds more than this many lines a rewrite would drop (and more
than half as many as it keeps): rarely, and never for a few lines."""


@dataclass(slots=True)
class Owed:
    """A delivery still owed: the event (as sent) and the endpoint it goes to."""

    key: str
    endpoint: str
    event: dict[str, Any]
    at: float


class Journal:
    """What is owed and what is settled, in memory, with the file as its record (``path``
    None: memory only, nothing survives a restart)."""

    def __init__(self, path: Path | None, keep: float) -> None:
        self.path = path
        self.keep = keep
        self.owed: dict[str, Owed] = {}
        self.settled: dict[str, tuple[float, str]] = {}
        """key -> (when, how: delivered | failed | duplicate)"""
        self._buffer: list[bytes] = []
        self._lines = 0
        self._lock = asyncio.Lock()

    def load(self) -> None:
        """Replay the file (at start, before anything is queued)."""
        if self.path is None or not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a line cut by a crash: dropped, or the next append would join it
            with self.path.open("r+b") as f:
                f.truncate(end)
            data = data[:end]
        torn = 0
        for line in data.splitlines():
            self._lines += 1
            try:
                self._apply(orjson.loads(line))
            except (orjson.JSONDecodeError, KeyError, TypeError):
                torn += 1
        if torn:
            log.warning("webhooks: %d unreadable line(s) in %s skipped", torn, self.path)
        self._prune(time.time())

    def _apply(self, rec: dict[str, Any]) -> None:
        if "q" in rec:  # after a settled line only when taken over from another instance
            key = rec["q"]
            self.settled.pop(key, None)
            self.owed[key] = Owed(key, rec["ep"], rec["event"], float(rec["at"]))
        else:
            key = rec["d"]
            self.owed.pop(key, None)
            self.settled[key] = (float(rec["at"]), str(rec["r"]))

    def known(self, key: str) -> bool:
        """Whether this delivery is owed or settled already (then it is not queued again)."""
        return key in self.owed or key in self.settled

    def queue(self, owed: Owed) -> None:
        self.settled.pop(owed.key, None)
        self.owed[owed.key] = owed
        self._write({"q": owed.key, "ep": owed.endpoint, "event": owed.event, "at": owed.at})

    def settle(self, key: str, how: str) -> None:
        self.owed.pop(key, None)
        now = time.time()
        self.settled[key] = (now, how)
        self._write({"d": key, "r": how, "at": now})

    def _write(self, rec: dict[str, Any]) -> None:
        if self.path is not None:
            self._buffer.append(orjson.dumps(rec) + b"\n")

    def _prune(self, now: float) -> None:
        old = [k for k, (at, _) in self.settled.items() if now - at > self.keep]
        for k in old:
            del self.settled[k]
        for k in [k for k, o in self.owed.items() if now - o.at > self.keep]:
            del self.owed[k]  # owed longer than anyone remembers it: dropped with a line
            log.warning("webhooks: an event owed for longer than keep_delivered was dropped")

    async def sync(self) -> None:
        """Write the lines added since the last call and fsync them (in a thread: the loop
        keeps serving); rewrite the file when it is mostly history."""
        if self.path is None or not self._buffer:
            return
        async with self._lock:
            lines, self._buffer = self._buffer, []
            try:
                await asyncio.to_thread(self._append, lines)
            except BaseException:
                self._buffer[:0] = lines  # written again next time (a full disk, a cancel)
                raise
            self._lines += len(lines)
            live = len(self.owed) + len(self.settled)
            waste = self._lines - live  # lines a rewrite drops: the queued line of a settled key
            if waste > max(COMPACT_MIN_LINES, live // 2):
                self._prune(time.time())
                records = [
                    {"d": k, "r": how, "at": at} for k, (at, how) in self.settled.items()
                ] + [
                    {"q": o.key, "ep": o.endpoint, "event": o.event, "at": o.at}
                    for o in self.owed.values()
                ]
                await asyncio.to_thread(self._rewrite, records)
                self._lines = len(records)

    def _append(self, lines: list[bytes]) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"".join(lines))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        assert self.path is not None
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"".join(orjson.dumps(r) + b"\n" for r in records))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
