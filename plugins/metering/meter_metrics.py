"""What ``tollway meter`` exposes on ``GET /metrics``: a source of the core's registry
(``proxy.metrics.Metrics``, without the gateway's request counters), so both processes share
one exposition path.

Every figure is read as it is at scrape time, from memory: the counters the meter's handling
keeps, the backlog its consumer thread measured last (``Meter.measure``, at most a second or
so old), the outage state the consumer keeps, the admin query counters. A scrape never talks
to Redis, so it answers at once while Redis is down or frozen. The stream's figures have no
sample while Redis is unavailable (as ``/admin/stats`` says null): an alert on the backlog
does not fire on a stale value, the Redis alert fires instead.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from proxy.metrics import Sample

if TYPE_CHECKING:
    from plugins.metering.analytics import Analytics
    from plugins.metering.stream import Meter


def meter_metrics(meter: Meter, analytics: Analytics) -> dict[str, Sample]:
    """The meter's figures, in the ``Metrics.add`` source shape."""
    reachable = meter.outage.available
    backlog = meter.backlog if reachable else None
    entries = age = shipping = None
    if backlog is not None:
        entries, shipping = backlog["stream_entries"], backlog["gateways_shipping"]
        measured = backlog["oldest_unloaded_age_s"]
        # still there as far as anyone knows: it grows until a measurement says otherwise,
        # so a consumer stuck on one chunk shows an ageing backlog, not a frozen one
        age = measured + time.monotonic() - meter.measured_at if measured else 0.0
    return {
        "tollway_meter_rows_loaded": (
            "counter",
            "Usage rows loaded into DuckDB from the stream (a chunk loaded twice adds none).",
            meter.loaded_rows,
            (),
        ),
        "tollway_meter_chunks_loaded": (
            "counter",
            "Stream entries of usage rows loaded into DuckDB.",
            meter.chunks_loaded,
            (),
        ),
        "tollway_meter_load_errors": (
            "counter",
            "Chunks whose load into DuckDB failed (they stay pending and are retried).",
            meter.load_errors,
            (),
        ),
        "tollway_meter_chunk_load_seconds": (
            "histogram",
            "Time to load one chunk of the stream into DuckDB.",
            meter.load_seconds.value(),
            (),
        ),
        "tollway_meter_stream_entries": (
            "gauge",
            "Entries in the usage stream not loaded yet (no sample while Redis is unavailable).",
            entries,
            (),
        ),
        "tollway_meter_oldest_unloaded_age_seconds": (
            "gauge",
            "Age of the oldest usage row in the stream not loaded yet (0: none; no sample "
            "while Redis is unavailable).",
            age,
            (),
        ),
        "tollway_meter_gateways_shipping": (
            "gauge",
            "Gateways that shipped usage rows and have not stopped (tollway:usage:shipped).",
            shipping,
            (),
        ),
        "tollway_meter_redis_available": (
            "gauge",
            "1 while the meter's last attempt reached Redis (state.url), else 0.",
            1 if reachable else 0,
            (),
        ),
        "tollway_meter_redis_unavailable_seconds": (
            "gauge",
            "Seconds since the meter lost Redis (0 while it reaches it).",
            meter.outage.down_for() or 0.0,
            (),
        ),
        "tollway_meter_admin_queries": (
            "counter",
            "Admin SQL queries started on the meter's database.",
            analytics.queries,
            (),
        ),
        "tollway_meter_admin_queries_stopped": (
            "counter",
            "Admin SQL queries interrupted at query_timeout.",
            analytics.timeouts,
            (),
        ),
        "tollway_meter_admin_queries_refused": (
            "counter",
            "Admin SQL queries refused because query_concurrency were running.",
            analytics.refused,
            (),
        ),
        "tollway_meter_database_bytes": (
            "gauge",
            "Size of the usage database file and its write-ahead log.",
            database_bytes(meter.db.path),
            (),
        ),
    }


def database_bytes(path: str) -> int | None:
    """The database file's size with its ``.wal`` (None: in memory, or not created yet)."""
    if path == ":memory:":
        return None
    total = None
    for name in (path, f"{path}.wal"):
        try:
            total = (total or 0) + os.stat(name).st_size
        except FileNotFoundError:
            continue
    return total
