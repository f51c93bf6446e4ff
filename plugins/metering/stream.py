"""Usage rows of many gateways into one database: a Redis Stream and the ``tollway meter``.

DuckDB locks its file to one process, so with several gateway instances (``metering.sink:
redis``) no gateway opens the database. Each still writes its rows to its own crash-safe spool
first; its loader thread then ships every closed segment to the stream ``tollway:usage`` in
chunks of ``CHUNK_ROWS`` rows (one entry each) and keeps the segment in ``shipped/`` until
the meter has loaded it (``StreamShipper.settle``: Redis restarted empty or flushed before
that, it ships it again). One ``tollway meter`` process (a consumer group member, so a second
one can take over) reads the entries, loads each chunk into DuckDB through the same idempotent
path as a spool segment (a chunk is known by its first row's request id, recorded with its
rows in one transaction), and acknowledges an entry only after that commit. Hence no row is
lost (a gateway killed after shipping re-ships the segment; a meter killed before its
acknowledgement gets the entry again; Redis lost its data before the meter loaded them: the
gateway ships its kept segments again) and none is counted twice (a chunk already loaded adds
nothing, and counts nothing). The meter's consumer thread and a query's drain handle entries
one at a time, and the consumer skips what a drain took from under its read (``Meter._step``).

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

import contextlib
import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from plugins.metering.outage import RedisOutage
from proxy.metrics import Histogram
from proxy.redisurl import redis_url, timeouts
from proxy.statewatch import EPOCH_KEY, claim_epoch, is_state_error

if TYPE_CHECKING:
    from plugins.metering.database import UsageDB

log = logging.getLogger("tollway.meter")

STREAM = "tollway:usage"
SHIPPED = "tollway:usage:shipped"
"""Hash: a gateway's spool owner -> the time before which all its rows are in the stream."""
LOADED = "tollway:usage:loaded"
"""``EPOCH ID``: every entry the meters' group holds with an id below ID (under the Redis epoch
EPOCH, ``proxy.statewatch``) is loaded and acknowledged; gateways delete what they kept of it."""
KEPT = "shipped"
"""A spool's subfolder of shipped segments, kept until the meter has loaded them."""
GROUP = "meters"
CHUNK_ROWS = 1000
CLAIM_IDLE_MS = 60_000
"""An entry another meter read but did not acknowledge for this long is taken over."""
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds to load one chunk (``CHUNK_ROWS`` rows at most): milliseconds when all is well."""
MEASURE_EVERY = 1.0
"""Seconds between two measurements of the backlog by the consumer (``Meter.measure``)."""


_PUBLISH_LOADED = """
local epoch = redis.call('GET', KEYS[3])
if not epoch then return 0 end
local pending = redis.pcall('XPENDING', KEYS[1], ARGV[1])
if pending.err then return 0 end  -- NOGROUP: flushed since; the meter makes it again
local bound = nil
if pending[1] > 0 then
  bound = pending[2]
else
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local name, last
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
    end
    if name == ARGV[1] and last then
      local ms, seq = string.match(last, '(%d+)-(%d+)')
      bound = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
    end
  end
end
if not bound then return 0 end
redis.call('SET', KEYS[2], epoch .. ' ' .. bound)
return 1
"""
"""Record in ``LOADED`` the id below which the group acknowledged every entry: its oldest
pending entry, or past the last one it was given. One script: the epoch, the group's state and
the record are read and written at one instant (a flush in between cannot pair them wrongly)."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _id(entry_id: str) -> tuple[int, int]:
    """A stream entry id ``ms-seq`` as a tuple that sorts like Redis sorts them."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _redis(url: str) -> Any:
    import redis  # only a Redis deployment loads redis-py

    # a frozen Redis must not stall the loader thread for good; a consumer's blocking read
    # (XREADGROUP BLOCK, up to a second) waits on the server, so the default allows for it
    return redis.Redis.from_url(redis_url(url), **timeouts(url, default=5.0))


class StreamShipper:
    """Gateway side: closed spool segments -> stream entries (runs in the loader thread)."""

    def __init__(self, url: str, stream: str = STREAM) -> None:
        self.client = _redis(url)
        self.stream = stream

    def ship(self, segment: Path) -> int:
        """Send a segment's complete rows, then keep it in ``shipped/`` (see ``settle``) under
        the epoch and last entry id it went with; returns the rows sent."""
        lines = [line for line in segment.read_bytes().split(b"\n") if line]
        if not lines:
            segment.unlink(missing_ok=True)
            return 0
        # one transaction: the epoch read is the one the entries were added under (a flush
        # between the two would otherwise label lost entries with the new epoch)
        with self.client.pipeline(transaction=True) as pipe:
            claim_epoch(pipe)
            for i in range(0, len(lines), CHUNK_ROWS):
                pipe.xadd(self.stream, {"rows": b"\n".join(lines[i : i + CHUNK_ROWS])})
            replies = pipe.execute()
        epoch, last = _text(replies[1]), _text(replies[-1])
        name = segment.name.split(".", 2)[2] if segment.parent.name == KEPT else segment.name
        kept = segment.parent if segment.parent.name == KEPT else segment.parent / KEPT
        kept.mkdir(exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # a sibling re-shipped it at once
            segment.rename(kept / f"{epoch}.{last}.{name}")
        return len(lines)

    def settle(self, spool: Path) -> int:
        """Delete the kept segments of ``spool`` the meter has loaded; ship again those sent
        under an earlier epoch (Redis restarted empty or was flushed before the meter loaded
        them: the meter's chunk markers make a second load of a loaded chunk add nothing).
        Runs once a flush, in the loader thread; returns the segments shipped again."""
        kept = sorted((spool / KEPT).glob("*.jsonl"))
        if not kept:
            return 0
        epoch, loaded = self.client.mget(EPOCH_KEY, LOADED)
        epoch = _text(epoch) if epoch is not None else None
        loaded_epoch, _, bound = (_text(loaded) if loaded else "").partition(" ")
        again = 0
        for path in kept:
            seg_epoch, last = path.name.split(".", 2)[:2]
            if seg_epoch != epoch:
                try:
                    self.ship(path)
                except FileNotFoundError:  # a sibling process on this spool shipped it first
                    continue
                again += 1
            elif loaded_epoch == epoch and _id(last) < _id(bound):
                path.unlink(missing_ok=True)
        if again:
            log.warning("Redis lost usage rows not yet loaded; shipped %d segments again", again)
        return again

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
        # figures of ``tollway meter``'s /metrics, written by whoever handles entries (under
        # ``_handling``) and read as they are at scrape time
        self.loaded_rows = 0
        self.chunks_loaded = 0
        self.load_errors = 0
        self.load_seconds = Histogram(LOAD_BUCKETS)
        self.backlog: dict[str, float | int | None] | None = None  # ``measure``'s last figures
        self.measured_at = 0.0  # time.monotonic() of that measurement
        self._publish_loaded = self.client.register_script(_PUBLISH_LOADED)
        # The consumer thread and a query's drain (another thread) share this consumer name,
        # so a drain reading "our pending entries" also gets those the consumer's blocking
        # read was just given. Handling one entry twice at once is not harmless: a deletion
        # request handled again after the consumer loaded the rows shipped behind it would
        # delete them too. So entries are handled under one lock, one thread at a time, and
        # what a drain handles while the consumer waits on its read is noted, for the
        # consumer to skip. (Re-entrant: whoever holds it may drain.)
        self._handling = threading.RLock()
        self._waiting = False  # the consumer's blocking read is under way
        self._taken: set[bytes] = set()  # entries a drain handled meanwhile
        self._grouped = False  # the consumer group is known to exist (``_create_group``)
        self.outage = RedisOutage()  # updated by the consumer loop (``plugins.metering.meter``)
        try:
            self._create_group()
        except Exception as e:
            if not is_state_error(e):
                raise
            # Redis is down as the meter starts: the first ``step`` that reaches it makes the
            # group, so the meter can serve (and say Redis is unavailable) meanwhile
            self.outage.failed(e)

    def _create_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except Exception as e:  # BUSYGROUP: it exists (another meter, or an earlier run)
            if "BUSYGROUP" not in str(e):
                raise
        self._grouped = True

    def step(self, block_ms: int = 1000, count: int = 20) -> int:
        """Handle what is pending (this meter's unacknowledged entries first, then entries
        another meter left unacknowledged too long, then new ones); returns entries handled.

        Redis restarted without its data or was flushed (the group is gone: NOGROUP; or the
        stream went while a read waited on it: UNBLOCKED): the group is made again, from the
        stream's start, and the next step goes on. Rows loaded before are not loaded twice if
        they come again (chunk markers in the database).

        The group not made yet (Redis was down when the meter started): it is made first; a
        state error (``proxy.statewatch.is_state_error``) means Redis is still unreachable."""
        if not self._grouped:
            self._create_group()
        try:
            n = self._step(block_ms, count)
        except Exception as e:
            if "NOGROUP" not in str(e) and "UNBLOCKED" not in str(e):
                raise
            log.warning("the usage stream lost its data (Redis restarted or flushed); resuming")
            self._create_group()
            n = self._step(0, count)  # what was shipped since is not left for later
        if n:  # gateways may now delete the segments they kept of it
            self._publish_loaded(keys=[self.stream, LOADED, EPOCH_KEY], args=[self.group])
        return n

    def _step(self, block_ms: int, count: int) -> int:
        with self._handling:
            entries = self._read("0", 0, count)  # ours, read before a crash, not acknowledged
            if not entries:
                claimed = self.client.xautoclaim(
                    self.stream, self.group, self.consumer, CLAIM_IDLE_MS, "0-0", count=count
                )
                entries = claimed[1] if claimed else []
            if not entries and not block_ms:
                entries = self._read(">", 0, count)
            if entries or not block_ms:
                return self._handle_all(entries)
            self._waiting = True
            self._taken.clear()
        try:  # wait for new entries without holding the lock: a drain may run meanwhile
            entries = self._read(">", block_ms, count)
        except BaseException:
            with self._handling:
                self._waiting = False
            raise
        with self._handling:
            self._waiting = False
            return self._handle_all([e for e in entries if e[0] not in self._taken])

    def _handle_all(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> int:
        """Handle entries in order (the caller holds ``_handling``); returns how many."""
        for entry_id, fields in entries:
            self.handle(entry_id, fields)
            if self._waiting:  # a drain took it from under the consumer's read
                self._taken.add(entry_id)
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
            # a file of its own, named by the entry: the same rows may come again under
            # another entry (a gateway ships a segment again), not the same entry at once
            fd, name = tempfile.mkstemp(dir=self.folder, prefix=entry_id.decode(), suffix=".jsonl")
            with os.fdopen(fd, "wb") as f:
                f.write(rows + b"\n")
            started = time.perf_counter()
            try:
                added = self.db.ingest(Path(name), stream=True)  # idempotent; deletes it
            except Exception:
                self.load_errors += 1
                raise
            self.load_seconds.observe(time.perf_counter() - started)
            self.loaded_rows += added
            self.chunks_loaded += 1
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

    def measure(self, every: float = MEASURE_EVERY) -> None:
        """Take ``freshness`` again if the last one is ``every`` seconds old: run by the
        consumer thread, so ``/metrics`` reads figures at most that old and never waits on
        Redis itself (a frozen Redis holds this thread, not a scrape)."""
        now = time.monotonic()
        if self.backlog is not None and now - self.measured_at < every:
            return
        self.backlog = self.freshness()
        self.measured_at = time.monotonic()

    def close(self) -> None:
        self.client.close()
        for leftover in self.folder.glob("*"):
            leftover.unlink(missing_ok=True)
        self.folder.rmdir()
