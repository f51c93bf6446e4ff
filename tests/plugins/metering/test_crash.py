"""metering survives `kill -9`: every answered request has exactly one row after a restart.

A real `tollway serve` (metering with a 30 s flush interval, so rows wait in the spool) and an
emulator run as subprocesses; a threaded workload records the request id of every reply that
came back whole; the gateway is killed mid-workload and restarted on the same files. The data
commands (`tollway sql/report/export` with --url, `sql/invoice` with --db) are checked too.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import httpx2
import openai
import orjson
import pytest

from plugins.metering.database import MIGRATIONS
from tests.conftest import free_port
from tests.procs import ROOT, TOLLWAY, Proc, running, wait_for

ADMIN = "crash-admin-key"
KEY = "tw_crash_test_key_0123456789"
POLICY = """\
version: 1
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{key: {{$env: TOLLWAY_ADMIN_KEY}}}}
state: {{dir: null}}
providers:
  openai: {{kind: openai, base_url: "http://127.0.0.1:{emu}/v1", api_key: k,
           retries: {{attempts: 0}}}}
models:
  gpt-5.4-mini: {{provider: openai, input_per_mtok: 0.25, output_per_mtok: 2.0}}
features:
  basic_suggestions: {{price_per_request: 0.01}}
tiers:
  pro: {{monthly_cost: 29}}
chain:
  - name: auth
    config:
      keys: [{{id: crash-key, user: crash, tier: pro, sha256: {sha}}}]
  - name: metering
    config: {{database: {db}, flush_interval: 30s, export_dir: {exports}}}
"""
ENV = {"TOLLWAY_ADMIN_KEY": ADMIN}
REQUESTS = 60
KILL_AFTER = 25  # complete replies before the kill


def tollway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TOLLWAY, *args],
        cwd=ROOT,
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=60,
    )


def sql(where: list[str], query: str) -> list[list[Any]]:
    """`tollway sql --json` against --url URL or --db FILE."""
    res = tollway("sql", *where, "--json", query)
    assert res.returncode == 0, res.stderr
    return orjson.loads(res.stdout)["rows"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def emulator_port() -> Iterator[int]:
    port = free_port()
    with running([*TOLLWAY, "emulator", "--port", str(port)], "emulator listening"):
        yield port


class Workload:
    """Chat requests from a thread pool; keeps the ids of replies that came back whole."""

    def __init__(self, url: str) -> None:
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=10)
        self.complete: list[str] = []
        self.failed = 0
        self.in_flight_at_kill = 0  # failed requests that were sent before the kill
        self.killed_at = float("inf")
        self.lock = threading.Lock()

    def one(self, i: int) -> None:
        text = f"request number {i} please"
        msgs = [{"role": "user", "content": text}]
        headers = {"x-emulator-latency-ms": str(40 + (i * 37) % 160)}
        started = time.monotonic()
        try:
            if i % 5 == 0:  # some streams: complete once the last chunk and [DONE] arrived
                stream = self.client.chat.completions.create(
                    model="gpt-5.4-mini",
                    messages=msgs,  # type: ignore[arg-type]
                    stream=True,
                    extra_headers={**headers, "x-emulator-chunk-delay-ms": "5"},
                )
                content, finish = "", None
                for chunk in stream:
                    if chunk.choices:
                        content += chunk.choices[0].delta.content or ""
                        finish = chunk.choices[0].finish_reason or finish
                if finish != "stop" or content != f"Echo: {text}":
                    raise httpx2.RemoteProtocolError(f"incomplete stream: {content!r}")
                rid = stream.response.headers["x-request-id"]
            else:
                raw = self.client.chat.completions.with_raw_response.create(
                    model="gpt-5.4-mini",
                    messages=msgs,  # type: ignore[arg-type]
                    extra_headers=headers,
                )
                reply = raw.parse()
                assert reply.choices[0].message.content == f"Echo: {text}"
                rid = raw.headers["x-request-id"]
        except (openai.APIError, httpx2.HTTPError):
            with self.lock:
                self.failed += 1
                self.in_flight_at_kill += started < self.killed_at
            return
        with self.lock:
            self.complete.append(rid)

    def close(self) -> None:
        self.client.close()


def test_kill_9_restart_and_the_data_commands(emulator_port: int, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    db = tmp_path / "usage.duckdb"
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        POLICY.format(
            port=port,
            emu=emulator_port,
            db=db,
            exports=tmp_path / "exports",
            sha=hashlib.sha256(KEY.encode()).hexdigest(),
        )
    )
    serve = [*TOLLWAY, "serve", "--policy", str(policy)]

    # ---- the workload, and kill -9 while requests are in flight --------------------------------
    gw = Proc(serve, ENV)
    try:
        gw.wait_for("tollway listening")
        work = Workload(url)
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(work.one, i) for i in range(REQUESTS)]
            wait_for(lambda: len(work.complete) >= KILL_AFTER, 20.0, gw.text)
            work.killed_at = time.monotonic()
            gw.popen.send_signal(signal.SIGKILL)
            for f in futures:
                f.result()
        work.close()
    finally:
        gw.stop()
    assert gw.popen.returncode == -signal.SIGKILL
    recorded = set(work.complete)
    assert len(recorded) == len(work.complete) >= KILL_AFTER
    assert len(recorded) + work.failed == REQUESTS
    assert work.in_flight_at_kill > 0, "killed while requests were in flight"

    # the rows were still in the spool (30 s flush interval), not in DuckDB; the segment being
    # written when the gateway died keeps its zero-filled tail until the spool is reopened
    spooled = [
        orjson.loads(line)["request_id"]
        for seg in (tmp_path / "usage.spool").glob("*.jsonl")
        for line in seg.read_bytes().rstrip(b"\0").splitlines()
        if line.strip()
    ]
    assert recorded <= set(spooled)

    # ---- a stopped gateway's files, read offline (a copy: --db loads the spool into it) ------
    offline = tmp_path / "offline"
    offline.mkdir()
    for p in tmp_path.iterdir():
        if p.name.startswith("usage."):
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, offline / p.name)
    rows = sql(["--db", str(offline / "usage.duckdb")], "SELECT request_id FROM usage")
    assert recorded <= {r[0] for r in rows}

    # ---- restart on the same files: every complete reply is in usage exactly once -------------
    with running(serve, "tollway listening", ENV) as gw2:
        where = ["--url", url]
        rows = sql(
            where,
            "SELECT request_id, status, input_tokens, output_tokens, cost_usd, price_usd "
            "FROM usage",
        )
        by_id = {r[0]: r for r in rows}
        assert len(by_id) == len(rows)
        assert recorded <= set(by_id), recorded - set(by_id)
        for rid in recorded:
            _, status, inp, out, cost, price = by_id[rid]
            assert status == 200 and inp > 0 and out > 0, by_id[rid]
            assert Decimal(cost) == (inp * Decimal("0.25") + out * Decimal(2)) / 1_000_000
            assert Decimal(price) == Decimal("0.01")
        dups = sql(where, "SELECT request_id, count(*) FROM usage GROUP BY 1 HAVING count(*) > 1")
        assert dups == []
        segments = list((tmp_path / "usage.spool").glob("*.jsonl"))
        # what is left is the open segment, allocated and still without a row
        assert len(segments) == 1, segments
        assert not segments[0].read_bytes().strip(b"\0"), "the spool was loaded"
        versions = sql(where, "SELECT version, applied_at FROM schema_version")
        assert [v[0] for v in versions] == list(range(1, len(MIGRATIONS) + 1))

        # the database belongs to the running gateway: --db refuses, pointing at --url
        res = tollway("sql", "--db", str(db), "SELECT 1")
        assert res.returncode != 0 and "use --url" in res.stderr

        # the restarted gateway meters new traffic too
        after = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        for _ in range(3):
            raw = after.chat.completions.with_raw_response.create(
                model="gpt-5.4-mini",
                messages=[{"role": "user", "content": "after the restart"}],
            )
            recorded.add(raw.headers["x-request-id"])
        after.close()
        live = {r[0] for r in sql(where, "SELECT request_id FROM usage")}
        assert recorded <= live

        report = tollway("report", *where)
        assert report.returncode == 0, report.stderr
        out = report.stdout
        assert "Technical KPIs" in out and "Targets" in out and "Business (per month)" in out
        for label, verdict in (
            ("cache hit rate (%)", "MISSED"),  # no cache in this chain: 0 %
            ("average response (ms)", "MET"),
            ("error rate (%)", "MET"),
        ):
            line = next(x for x in out.splitlines() if x.strip().startswith(label))
            assert line.rstrip().endswith(verdict), line
        assert re.search(rf"^ +requests +{len(live)}$", out, re.M), out

        parquet = tmp_path / "exports" / "parquet"
        # a folder name under the gateway's export_dir
        res = tollway("export", *where, "--parquet", parquet.name)
        assert res.returncode == 0, res.stderr
        assert f"exported {len(live)} rows" in res.stdout
        days = sorted(p.name for p in parquet.iterdir())
        assert days and all(d.startswith("day=") for d in days)
        con = duckdb.connect()
        back = con.execute(
            "SELECT count(*), count(DISTINCT request_id), min(CAST(ts AS DATE)) = min(day) "
            "FROM read_parquet(?, hive_partitioning = true)",
            [str(parquet / "*" / "*.parquet")],
        ).fetchone()
        con.close()
        assert back == (len(live), len(live), True)
        month = sql(where, "SELECT DISTINCT strftime(ts, '%Y-%m') FROM usage")
    assert gw2.popen.returncode == 0  # SIGTERM: a clean stop

    # ---- stopped: the same rows through --db -------------------------------------------------
    offline_where = ["--db", str(db)]
    assert {r[0] for r in sql(offline_where, "SELECT request_id FROM usage")} == live
    assert sql(offline_where, "SELECT version, applied_at FROM schema_version") == versions
    # opened again (and again): the migration is not re-applied
    assert sql(offline_where, "SELECT version, applied_at FROM schema_version") == versions

    assert len(month) == 1
    m = month[0][0]
    res = tollway("invoice", *offline_where, "--user", "crash", "--month", m, "--format", "csv")
    assert res.returncode == 0, res.stderr
    table = list(csv.DictReader(io.StringIO(res.stdout)))
    ((qty,),) = sql(
        offline_where, "SELECT count(*) FROM usage WHERE user_id = 'crash' AND status < 400"
    )
    assert [(r["description"], r["quantity"], r["unit_price"], r["total"]) for r in table] == [
        (f"pro plan, {m}", "1", "29", "29.00"),
        ("AI API: chat / basic_suggestions", str(qty), "0.01", str(Decimal("0.01") * qty)),
        ("Total", "", "", str(Decimal(29) + Decimal("0.01") * qty)),
    ]
