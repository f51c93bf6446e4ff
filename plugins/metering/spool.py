"""The metering spool: append-only JSONL segments that survive a killed process.

A row is copied into a shared memory map of the open segment file: the bytes are in the
kernel's page cache the moment the copy ends (no Python buffer to lose, no fsync per row), so
once a reply is out its row outlives a SIGKILL of the gateway. A map rather than one
``os.write`` per row because, measured under c=32 load, that system call cost 13-16 µs per
request, a tenth of a bare proxy's whole CPU per request; a copy into the map costs well under
1 µs, plus one page fault per 4 KiB (~6 rows).

Each segment is allocated at its full size when opened (``posix_fallocate``, so a full disk is
an error at rotation, never a SIGBUS in the middle of a request) and cut back to its rows when
closed. A segment left by a killed process still has its zero-filled tail, and perhaps a row
cut short: opening the spool trims every leftover segment after its last complete line. The
writer rotates segments and loads closed ones into DuckDB in batches; a segment is deleted only
after its rows were committed, and loading is idempotent, so a crash at any point neither loses
nor doubles a row. Memory stays bounded: the disk is the buffer, never a growing list.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

import orjson

_SUFFIX = ".jsonl"
SEGMENT_BYTES = 16 << 20
"""Room in one segment (~25,000 rows of ~650 bytes); a full segment continues in the next."""


def trim(path: Path) -> None:
    """Cut a segment after its last complete line (a killed writer's zero tail, a torn row)."""
    size = path.stat().st_size
    if size == 0:
        return
    with path.open("r+b") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as m:
        end = m.rfind(b"\n") + 1
    if end != size:
        os.truncate(path, end)


class Spool:
    """Segments ``NNNNNNNNNNNN.jsonl`` in ``folder``; the highest number is being written."""

    def __init__(self, folder: Path, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.folder = folder
        self.segment_bytes = segment_bytes
        folder.mkdir(parents=True, exist_ok=True)
        existing = self.segments()
        for path in existing:
            trim(path)
        self._seq = int(existing[-1].stem) + 1 if existing else 1
        self._fd = -1
        self._map: mmap.mmap | None = None
        self._pos = 0
        self.rows = 0  # rows in the open segment
        self.total = 0
        self._open()

    def _path(self, seq: int) -> Path:
        return self.folder / f"{seq:012d}{_SUFFIX}"

    def _open(self) -> None:
        self.current = self._path(self._seq)
        fd = os.open(self.current, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.segment_bytes)
            self._map = mmap.mmap(fd, self.segment_bytes)
        except BaseException:
            os.close(fd)
            self.current.unlink(missing_ok=True)
            raise
        self._fd = fd
        self._pos = 0
        self.rows = 0

    def _close_segment(self) -> None:
        """Unmap the open segment and cut it to its rows (it is then ready to load)."""
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.ftruncate(self._fd, self._pos)
            os.close(self._fd)
            self._fd = -1

    def segments(self) -> list[Path]:
        """Every segment on disk, oldest first (the open one last)."""
        return sorted(p for p in self.folder.glob(f"*{_SUFFIX}") if p.stem.isdigit())

    def append(self, row: dict[str, Any]) -> None:
        data = orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE)
        end = self._pos + len(data)
        if end > self.segment_bytes:
            if len(data) > self.segment_bytes:
                raise ValueError(f"a usage row of {len(data)} bytes does not fit a segment")
            self._next()
            end = len(data)
        assert self._map is not None
        self._map[self._pos : end] = data
        self._pos = end
        self.rows += 1
        self.total += 1

    def _next(self) -> None:
        self._close_segment()
        self._seq += 1
        self._open()

    def rotate(self) -> None:
        """Close the open segment (if it has rows) and start the next one."""
        if self.rows == 0:
            return
        self._next()

    def closed(self) -> list[Path]:
        """Segments ready to load: all but the open one."""
        return [p for p in self.segments() if p != self.current]

    def close(self) -> None:
        self._close_segment()
        if self.rows == 0:
            self.current.unlink(missing_ok=True)
