"""Usage rows of many gateways into one database: a Redis Stream and the ``tollway meter``.

DuckDB locks its file to one process, so with several gateway instances (``metering.sink:
redis``) no gateway opens the database. Each still writes its rows to its own crash-safe spool
first; its loader thread then ships every closed segment to the stream ``tollway:usage`` in
chunks of ``CHUNK_ROWS`` rows (one entry each) and deletes the segment only after Redis took
them all. One ``tollway meter`` process (a consumer group member, so a second one can take over)
reads the entries, loads each chunk into DuckDB through the same idempotent path as a spool
segment (a chunk is known by its first row's request id, recorded with its rows in one
transaction), and acknowledges an entry only after that commit. Hence no row is lost (a gateway
killed after shipping re-ships the segment; a meter killed before its acknowledgement gets the
entry again) and none is counted twice (a chunk already loaded adds nothing).

A deletion request (``DELETE /admin/users/{user}/data``) travels the same stream, behind the
rows shipped before it, so the meter deletes them too.

How fresh the meter's answers are: after each flush a gateway records in the hash
``tollway:usage:shipped`` (field: its spool owner) the time before which every row it wrote is
in the stream; it removes its field when it stops with nothing left to ship, and an adopter
removes a dead gateway's field once it shipped the orphan's segments. The meter reads that hash
before it drains the stream, so the smallest value (or the drain's own time) is a time before
which every row of every gateway is in its answer. A Redis flush empties the hash too; each
gateway writes its field again at its next flush (``flush_interval``).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from plugins.metering.database import UsageDB

log = logging.getLogger("tollway.meter")

STREAM = "tollway:usage"
SHIPPED = "tollway:usage:shipped"
"""Hash: a gateway's spool owner -> the time before which all its rows are in the stream."""
GROUP = "meters"
CHUNK_ROWS = 1000
CLAIM_IDLE_MS = 60_000
"""An entry another meter read but did not acknowledge for this long is taken over."""


def _redis(url: str) -> Any:
    import redis  # only a Redis deployment loads redis-py

    return redis.Redis.from_url(url)


class StreamShipper:
    """Gateway side: closed spool segments -> stream entries (runs in the loader thread)."""

    def __init__(self, url: str, stream: str = STREAM) -> None:
        self.client = _redis(url)
        self.stream = stream

    def ship(self, segment: Path) -> int:
        """Send a segment's complete rows, then delete it; returns the rows sent."""
        lines = [line for line in segment.read_bytes().split(b"\n") if line]
        if lines:
            with self.client.pipeline(transaction=False) as pipe:
                for i in range(0, len(lines), CHUNK_ROWS):
                    pipe.xadd(self.stream, {"rows": b"\n".join(lines[i : i + CHUNK_ROWS])})
                pipe.execute()
        segment.unlink(missing_ok=True)
        return len(lines)

    def mark(self, owner: str, until: float) -> None:
        """Every row ``owner`` wrote before ``until`` is in the stream (after a flush)."""
        self.client.hset(SHIPPED, owner, repr(until))

    def unmark(self, owner: str) -> None:
        """``owner`` has nothing left to ship (it stopped, or its orphan was adopted)."""
        self.client.hdel(SHIPPED, owner)

    def forget(self, user: str) -> None:
        """Ask the meter to delete a user's rows (after every row shipped before this)."""
        self.client.xadd(self.stream, {"forget": user.encode()})

    def close(self) -> None:
        self.client.close()


class Meter:
    """The ``tollway meter`` consumer: stream entries -> DuckDB, acknowledged after commit."""

    def __init__(
        self,
        db: UsageDB,
        url: str,
        consumer: str | None = None,
        stream: str = STREAM,
        group: str = GROUP,
    ) -> None:
        self.db = db
        self.client = _redis(url)
        self.stream = stream
        self.group = group
        # stable across restarts, so a restarted meter picks up what it read and did not
        # acknowledge at once (other meters take it over after CLAIM_IDLE_MS); two meters on
        # one host need names of their own (``tollway meter --name``)
        self.consumer = consumer or socket.gethostname()
        # inside the database's spool folder: the one folder its sandbox lets DuckDB read
        if db.spool_dir is not None:
            db.spool_dir.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="meter-", dir=db.spool_dir))
        self.loaded_rows = 0
        self._create_group()

    def _create_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except Exception as e:  # BUSYGROUP: it exists (another meter, or an earlier run)
            if "BUSYGROUP" not in str(e):
                raise

    def step(self, block_ms: int = 1000, count: int = 20) -> int:
        """Handle what is pending (this meter's unacknowledged entries first, then entries
        another meter left unacknowledged too long, then new ones); returns entries handled.

        Redis restarted without its data or was flushed (the group is gone: NOGROUP; or the
        stream went while a read waited on it: UNBLOCKED): the group is made again, from the
        stream's start, and the next step goes on. Rows loaded before are not loaded twice if
        they come again (chunk markers in the database)."""
        try:
            return self._step(block_ms, count)
        except Exception as e:
            if "NOGROUP" not in str(e) and "UNBLOCKED" not in str(e):
                raise
            log.warning("the usage stream lost its data (Redis restarted or flushed); resuming")
            self._create_group()
            return self._step(0, count)  # what was shipped since is not left for later

    def _step(self, block_ms: int, count: int) -> int:
        entries = self._read("0", 0, count)  # ours, read before a crash, not acknowledged
        if not entries:
            claimed = self.client.xautoclaim(
                self.stream, self.group, self.consumer, CLAIM_IDLE_MS, "0-0", count=count
            )
            entries = claimed[1] if claimed else []
        if not entries:
            entries = self._read(">", block_ms, count)
        for entry_id, fields in entries:
            self.handle(entry_id, fields)
        return len(entries)

    def _read(
        self, start: str, block_ms: int, count: int
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        reply = self.client.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=count, block=block_ms or None
        )
        return reply[0][1] if reply else []

    def handle(self, entry_id: bytes, fields: dict[bytes, bytes], ack: bool = True) -> None:
        rows = fields.get(b"rows")
        if rows is not None:
            # a file of its own: a query's drain may handle the same pending entry at once
            fd, name = tempfile.mkstemp(dir=self.folder, prefix=entry_id.decode(), suffix=".jsonl")
            with os.fdopen(fd, "wb") as f:
                f.write(rows + b"\n")
            self.loaded_rows += self.db.ingest(Path(name), stream=True)  # idempotent; deletes it
        forget = fields.get(b"forget")
        if forget is not None:
            n = self.db.delete_rows(user=forget.decode())
            log.info("deleted %d usage rows of a user on request", n)
        if ack:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.xack(self.stream, self.group, entry_id)
                pipe.xdel(self.stream, entry_id)  # loaded: the stream need not keep it
                pipe.execute()

    def drain(self) -> float:
        """Handle everything in the stream now (before answering a query); returns the time
        before which every gateway's rows are loaded (see the module docstring)."""
        until = min([time.time(), *(float(v) for v in self.client.hvals(SHIPPED))])
        while self.step(block_ms=0, count=100):
            pass
        return until

    def freshness(self) -> dict[str, float | int | None]:
        """What is not loaded yet: the stream's entries, the age of the oldest row among them,
        and how far behind the gateways' shipping is (``/admin/stats`` of the meter)."""
        now = time.time()
        shipped = [float(v) for v in self.client.hvals(SHIPPED)]
        first = self.client.xrange(self.stream, count=1)
        oldest = None
        if first:
            entry_id, fields = first[0]
            rows = fields.get(b"rows")
            line = rows.split(b"\n", 1)[0] if rows else b""
            try:
                oldest = float(orjson.loads(line)["ts"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                oldest = int(entry_id.split(b"-")[0]) / 1000  # when it was shipped
        return {
            "stream_entries": int(self.client.xlen(self.stream)),
            "oldest_unloaded_age_s": round(now - oldest, 3) if oldest is not None else None,
            "gateways_shipping": len(shipped),
            "fresh_as_of": min([now, *shipped]),
        }

    def close(self) -> None:
        self.client.close()
        for leftover in self.folder.glob("*"):
            leftover.unlink(missing_ok=True)
        self.folder.rmdir()
