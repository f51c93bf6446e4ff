"""The metering spool: rows in mapped segments, rotation, and what a killed writer leaves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest

from plugins.metering.spool import Spool, trim


def rows_in(paths: list[Path]) -> list[dict[str, object]]:
    out = []
    for p in paths:
        data = p.read_bytes()
        assert b"\0" not in data, f"{p.name} has a zero-filled tail"
        out += [orjson.loads(line) for line in data.splitlines()]
    return out


def test_rotate_closes_a_segment_cut_to_its_rows(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for i in range(3):
        spool.append({"request_id": f"r{i}", "n": i})
    assert spool.closed() == []
    spool.rotate()
    closed = spool.closed()
    assert len(closed) == 1
    assert rows_in(closed) == [{"request_id": f"r{i}", "n": i} for i in range(3)]
    assert closed[0].stat().st_size == sum(
        len(orjson.dumps({"request_id": f"r{i}", "n": i})) + 1 for i in range(3)
    )
    spool.rotate()  # nothing written since: no empty segment
    assert len(spool.closed()) == 1
    spool.close()
    assert spool.segments() == closed  # the empty open segment is removed on close


def test_a_full_segment_continues_in_the_next(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=4096)
    rows = [{"request_id": f"r{i}", "pad": "x" * 500} for i in range(40)]
    for row in rows:
        spool.append(row)
    spool.close()
    segments = spool.segments()
    assert len(segments) >= 5
    assert rows_in(segments) == rows
    assert all(p.stat().st_size <= 4096 for p in segments)


def test_a_row_larger_than_a_segment_is_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=1024)
    with pytest.raises(ValueError, match="does not fit"):
        spool.append({"pad": "x" * 2000})
    spool.append({"ok": True})
    spool.close()
    assert rows_in(spool.segments()) == [{"ok": True}]


def test_trim_drops_the_zero_tail_and_a_torn_row(tmp_path: Path) -> None:
    seg = tmp_path / "000000000001.jsonl"
    seg.write_bytes(b'{"a":1}\n{"a":2}\n{"a":3, "cut' + b"\0" * 5000)
    trim(seg)
    assert seg.read_bytes() == b'{"a":1}\n{"a":2}\n'
    only_zeros = tmp_path / "000000000002.jsonl"
    only_zeros.write_bytes(b"\0" * 100)
    trim(only_zeros)
    assert only_zeros.read_bytes() == b""


def test_rows_survive_a_sigkill_of_the_writer(tmp_path: Path) -> None:
    """Rows copied into the map are in the page cache: a killed writer loses none of them."""
    root = Path(__file__).resolve().parents[3]
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(root)!r})
        from plugins.metering.spool import Spool
        spool = Spool(__import__("pathlib").Path({str(tmp_path)!r}), segment_bytes=8192)
        for i in range(100):
            spool.append({{"request_id": f"r{{i}}", "pad": "y" * 100}})
        print("written", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout.strip() == "written"
    left = sorted(tmp_path.glob("*.jsonl"))
    assert b"\0" in left[-1].read_bytes()  # the open segment still has its allocated tail
    reopened = Spool(tmp_path)  # a new process: the dead one's segments are an orphan
    assert reopened.closed() == []
    [dead] = reopened.orphan_owners()
    with reopened.adopt(dead) as segments:  # trimmed after their last complete line
        assert [r["request_id"] for r in rows_in(segments)] == [f"r{i}" for i in range(100)]
        for seg in segments:
            seg.unlink()  # loaded
    assert reopened.orphan_owners() == []  # its lock file went with its last segment
    reopened.close()
    assert os.listdir(tmp_path) == []  # nothing left: segments loaded, lock file gone
