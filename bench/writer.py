"""The metering writer's sustained rate: spool appends (hot path) and DuckDB loads (background).

    python bench/writer.py [--rows 200000] [--batch-rows 5000] [--json]

In one process, with the plugin's own classes and nothing else: ``plugins.metering.spool.Spool``
appends ``--rows`` rows shaped like ``plugins.metering.plugin``'s (one row per request, every
column of ``plugins.metering.database.SPOOL_COLUMNS``), rotating every ``--batch-rows`` rows as
the plugin's loader does, and ``plugins.metering.database.UsageDB.ingest`` loads each closed
segment into a DuckDB file in a temporary folder, one segment at a time. Appending and loading are timed
separately (they alternate, they never overlap), so the numbers are each side's own cost:

- append: µs per row and rows/s of ``Spool.append`` (orjson + one copy into the mapped segment), the part the
  request pays for; building the row dict is not included (the chain bench measures that);
- load: rows/s of ``UsageDB.ingest``, the background worker thread's capacity; the first and
  last segments' rates show whether loading slows down as the table grows.

At the end the table must hold exactly one request per row; otherwise it exits 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the plugins live in the project
    sys.path.insert(0, str(ROOT))

from plugins.metering.database import SPOOL_COLUMNS, UsageDB  # noqa: E402
from plugins.metering.spool import Spool  # noqa: E402

FEATURES = ["basic_suggestions", "code_suggestions", "documentation", "context_awareness"]
MODELS = [("gpt-5.4-mini", "openai", 0.25, 2.0), ("claude-sonnet", "anthropic", 3.0, 15.0)]


def rows_for(n: int, seed: int = 7) -> list[dict[str, Any]]:
    """``n`` rows as the plugin writes them, one per request (a whole reply's, status 200).

    Every column of ``SPOOL_COLUMNS`` (the spool's schema) is present, so a column added to the
    plugin later is written too (as null if this function does not know it yet).
    """
    rnd = random.Random(seed)
    prefix = f"{rnd.getrandbits(32):08x}"
    out = []
    now = time.time()
    for i in range(n):
        model, provider, inp_price, out_price = MODELS[i % len(MODELS)]
        user = f"user_{rnd.randrange(500)}"
        inp, outp = rnd.randrange(20, 2000), rnd.randrange(1, 800)
        latency = rnd.uniform(200, 4000)
        known = {
            "ts": now + i / 2000,
            "request_id": f"req_{prefix}{i + 1:08x}",
            "final": True,
            "user_id": user,
            "key_id": f"key_{user[5:]}",
            "tier": "pro",
            "feature": FEATURES[i % len(FEATURES)],
            "endpoint": "chat",
            "provider": provider,
            "model": model,
            "upstream_model": model,
            "stream": False,
            "status": 200,
            "error_code": None,
            "cache": "bypass",
            "input_tokens": inp,
            "output_tokens": outp,
            "usage_estimated": False,
            "latency_ms": latency,
            "ttfb_ms": latency,
            "input_per_mtok": inp_price,
            "output_per_mtok": out_price,
            "price": 0.02,
            "saved_input": 0,
            "saved_output": 0,
            "retries": 0,
            "client_ip_hash": hashlib.sha256(f"10.0.{i % 250}.1".encode()).hexdigest()[:16],
            "shared": None,
        }
        out.append({k: known.get(k) for k in SPOOL_COLUMNS})
    return out


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def segment_sizes(db: UsageDB, spool: Spool, sizes: list[int]) -> list[dict[str, Any]]:
    """Load time of small segments, into the table as it is now (``repeat`` of each, median).

    The plugin closes a segment every ``flush_interval`` (1 s) or ``batch_rows`` rows, whichever
    comes first, so at a few thousand requests per second segments hold 1 s of rows, fewer than
    ``batch_rows``; a fixed cost per load shows here as ms per segment that barely shrink.
    """
    out = []
    for seed, size in enumerate(sizes, start=100):
        rows = rows_for(size * REPEAT, seed=seed)
        times, cpu = [], []
        for k in range(REPEAT):
            for row in rows[k * size : (k + 1) * size]:
                spool.append(row)
            spool.rotate()
            for segment in spool.closed():
                t0, c0 = time.perf_counter(), _cpu()
                db.ingest(segment)
                times.append(time.perf_counter() - t0)
                cpu.append(_cpu() - c0)
        ms = statistics.median(times) * 1000
        cpu_ms = statistics.median(cpu) * 1000
        out.append({"rows": size, "ms": ms, "cpu_ms": cpu_ms, "rows_per_s": size / ms * 1000})
    return out


REPEAT = 4
SIZES = [250, 1000, 2000, 5000]


def measure(n_rows: int, batch_rows: int, sizes: list[int] = SIZES) -> dict[str, Any]:
    rows = rows_for(n_rows)
    append_s: list[float] = []  # per segment
    load_s: list[float] = []
    load_cpu = 0.0  # process CPU (all threads: DuckDB loads on several) while loading
    loaded = 0
    with tempfile.TemporaryDirectory(prefix="tollway-writer-") as tmp_name:
        tmp = Path(tmp_name)
        db = UsageDB(tmp / "usage.duckdb")
        spool = Spool(tmp / "usage.spool")
        try:
            for start in range(0, len(rows), batch_rows):
                batch = rows[start : start + batch_rows]
                append = spool.append
                t0 = time.perf_counter()
                for row in batch:
                    append(row)
                append_s.append(time.perf_counter() - t0)
                spool.rotate()
                for segment in spool.closed():  # exactly the one just closed
                    t0, c0 = time.perf_counter(), _cpu()
                    loaded += db.ingest(segment)
                    load_s.append(time.perf_counter() - t0)
                    load_cpu += _cpu() - c0
            counted = db.con.execute("SELECT count(*) FROM usage").fetchone()
            requests = int(counted[0]) if counted else 0
            by_size = segment_sizes(db, spool, sizes)
        finally:
            spool.close()
            db.close()
        db_bytes = (tmp / "usage.duckdb").stat().st_size
    per_segment = [batch_rows / s for s in load_s]
    return {
        "rows": len(rows),
        "batch_rows": batch_rows,
        "segments": len(load_s),
        "append_us_per_row": sum(append_s) / len(rows) * 1e6,
        "append_rows_per_s": len(rows) / sum(append_s),
        "load_rows_per_s": loaded / sum(load_s),
        "load_cpu_us_per_row": load_cpu / loaded * 1e6,
        "load_cores": load_cpu / sum(load_s),
        "load_ms_per_segment_median": statistics.median(load_s) * 1000,
        "load_rows_per_s_first_segment": per_segment[0],
        "load_rows_per_s_last_segment": per_segment[-1],
        "requests_in_table": requests,
        "db_mb": db_bytes / 1e6,
        "by_segment_size": by_size,
        "ok": loaded == len(rows) == requests,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch-rows", type=int, default=5000, help="the plugin's batch_rows")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    r = measure(args.rows, args.batch_rows)
    if args.json:
        print(json.dumps(r))
    else:
        print(
            f"{r['rows']:,} rows in {r['segments']} segments of {r['batch_rows']}:\n"
            f"  append  {r['append_us_per_row']:.2f} µs/row ({r['append_rows_per_s']:,.0f} rows/s)\n"
            f"  load    {r['load_rows_per_s']:,.0f} rows/s (first segment "
            f"{r['load_rows_per_s_first_segment']:,.0f}, last "
            f"{r['load_rows_per_s_last_segment']:,.0f}; median "
            f"{r['load_ms_per_segment_median']:.1f} ms/segment; "
            f"{r['load_cpu_us_per_row']:.1f} µs CPU/row, {r['load_cores']:.2f} cores)\n"
            f"  table   {r['requests_in_table']:,} requests, DuckDB file {r['db_mb']:.1f} MB"
            + ("" if r["ok"] else "  ROW COUNT MISMATCH")
        )
        for x in r["by_segment_size"]:
            print(
                f"  segment of {x['rows']:>5} rows: {x['ms']:6.1f} ms, {x['cpu_ms']:6.1f} ms CPU "
                f"({x['rows_per_s']:,.0f} rows/s)"
            )
    return 0 if r["ok"] else 2


if __name__ == "__main__":
    raise SystemExit(main())
