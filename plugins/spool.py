"""The metering spool: append-only JSONL segments that survive a killed process.

A row is written with one ``os.write`` (into the kernel's page cache: no Python buffer to lose
and no fsync per row), so once a reply is out its row outlives a SIGKILL of the gateway. The
writer rotates segments and loads closed ones into DuckDB in batches; a segment is deleted only
after its rows were committed, and loading is idempotent, so a crash at any point neither loses
nor doubles a row. Memory stays bounded: the disk is the buffer, never a growing list.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

_SUFFIX = ".jsonl"


class Spool:
    """Segments ``NNNNNNNNNNNN.jsonl`` in ``folder``; the highest number is being written."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        existing = self.segments()
        self._seq = int(existing[-1].stem) + 1 if existing else 1
        self._fd = -1
        self.rows = 0  # rows in the open segment
        self.total = 0
        self._open()

    def _path(self, seq: int) -> Path:
        return self.folder / f"{seq:012d}{_SUFFIX}"

    def _open(self) -> None:
        self.current = self._path(self._seq)
        self._fd = os.open(self.current, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.rows = 0

    def segments(self) -> list[Path]:
        """Every segment on disk, oldest first (the open one last)."""
        return sorted(p for p in self.folder.glob(f"*{_SUFFIX}") if p.stem.isdigit())

    def append(self, row: dict[str, Any]) -> None:
        os.write(self._fd, orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE))
        self.rows += 1
        self.total += 1

    def rotate(self) -> None:
        """Close the open segment (if it has rows) and start the next one."""
        if self.rows == 0:
            return
        os.close(self._fd)
        self._seq += 1
        self._open()

    def closed(self) -> list[Path]:
        """Segments ready to load: all but the open one."""
        return [p for p in self.segments() if p != self.current]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if self.rows == 0:
                self.current.unlink(missing_ok=True)
