"""Issue 11, item 2: no admin query can stop the admin plane, the request path or shutdown.

Hostile queries (a cross join of two billion-row ranges) are replayed through
``POST /admin/sql``: each is interrupted at ``query_timeout`` or when its client leaves;
beyond ``query_concurrency`` they are refused at once; meanwhile other admin queries,
invoices, the loop's default executor, usage loading and the request path's latency are
unaffected; closing the usage store stops them at once.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from plugins.metering.analytics import Analytics
from plugins.metering.plugin import _STORE
from proxy.appkeys import RESOURCES
from tests.conftest import ADMIN_KEY, Gw, config_error, free_port
from tests.procs import TOLLWAY, running

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MSG = [{"role": "user", "content": "how long is a piece of string"}]
HOSTILE = "SELECT count(*) FROM range(1000000000) a, range(1000000000) b"


def chain(tmp: Path, **config: Any) -> str:
    opts = {"flush_interval": "50ms", "export_dir": str(tmp / "exports"), **config}
    extra = "".join(f", {k}: {v}" for k, v in opts.items())
    return (
        "chain:\n  - name: auth\n  - name: metering\n"
        f"    config: {{database: {tmp / 'usage.duckdb'}{extra}}}\n"
    )


def analytics(gw: Gw) -> Analytics:
    store = gw.app[RESOURCES].find(_STORE)
    assert store is not None and store.analytics is not None
    return store.analytics


async def sql(gw: Gw, query: str, patience: float = 30) -> tuple[int, Any, float]:
    """Status, JSON and seconds of one admin query; the client leaves after ``patience``."""
    t0 = time.perf_counter()
    async with gw.http.post(
        f"{gw.url}/admin/sql",
        json={"query": query},
        headers=ADMIN,
        timeout=aiohttp.ClientTimeout(total=patience),
    ) as r:
        return r.status, await r.json(), time.perf_counter() - t0


async def until(check: Any, within: float = 5.0) -> float:
    """Seconds until ``check()`` is true (fails the test after ``within``)."""
    t0 = time.perf_counter()
    while not check():
        assert time.perf_counter() - t0 < within, "condition not reached"
        await asyncio.sleep(0.01)
    return time.perf_counter() - t0


async def test_a_hostile_query_stops_at_the_time_limit(make_gateway: Any, tmp_path: Path) -> None:
    gw = await make_gateway(chain(tmp_path, query_timeout="1s"))
    for query in (
        HOSTILE,
        "SELECT sum(hash(a.range * b.range)) FROM range(99999) a, range(99999) b",
    ):
        status, res, took = await sql(gw, query)
        assert status == 400, res
        assert res["error"]["code"] == "query_timeout" and res["error"]["param"] == "query"
        assert "1s" in res["error"]["message"]
        assert 0.9 < took < 3.0, took  # it ran (a real query), and it stopped on time
    await until(lambda: not analytics(gw).busy, 1.0)  # its thread returned too
    async with gw.http.get(f"{gw.url}/metrics") as r:
        assert "tollway_admin_queries_stopped_total 2" in await r.text()
    status, res, took = await sql(gw, "SELECT 42 AS x")
    assert status == 200 and res == {"columns": ["x"], "rows": [[42]]} and took < 1.0


async def test_a_client_that_leaves_cancels_its_query(make_gateway: Any, tmp_path: Path) -> None:
    gw = await make_gateway(chain(tmp_path, query_timeout="30s", query_concurrency=2))
    for _ in range(2):
        with pytest.raises(TimeoutError):
            await sql(gw, HOSTILE, patience=0.5)
    # both slots free again long before the 30 s limit: the queries were interrupted
    assert await until(lambda: not analytics(gw).busy, 3.0) < 3.0
    status, res, took = await sql(gw, "SELECT count(*) AS n FROM usage")
    assert status == 200 and took < 2.0, res


async def test_answers_are_capped_in_rows_and_bytes(make_gateway: Any, tmp_path: Path) -> None:
    gw = await make_gateway(chain(tmp_path, query_max_rows=1000, query_max_bytes=65536))
    status, res, _ = await sql(gw, "SELECT * FROM range(1000)")
    assert status == 200 and len(res["rows"]) == 1000  # the limit itself is allowed
    status, res, took = await sql(gw, "SELECT * FROM range(1000000000)")
    assert status == 400 and res["error"]["code"] == "result_too_large", res
    assert "1000 rows" in res["error"]["message"] and took < 2.0  # streamed: stopped early
    status, res, _ = await sql(gw, "SELECT repeat('x', 10000) AS big FROM range(10)")
    assert status == 400 and res["error"]["code"] == "result_too_large", res
    assert "65536 bytes" in res["error"]["message"]
    status, res, _ = await sql(gw, "SELECT repeat('x', 1000) AS ok FROM range(10)")
    assert status == 200 and len(res["rows"]) == 10


async def test_spills_to_disk_are_capped(make_gateway: Any, tmp_path: Path) -> None:
    gw = await make_gateway(
        chain(tmp_path, memory_limit="64MB", query_memory_limit="16MB", temp_limit="20MB")
    )
    status, res, took = await sql(
        gw, "SELECT count(*) FROM (SELECT range FROM range(30000000) ORDER BY random())"
    )
    assert status == 400 and res["error"]["code"] == "sql_error", res
    assert "max_temp_directory_size" in res["error"]["message"] and took < 5.0
    spilled = sum(
        f.stat().st_size for f in (tmp_path / "usage.duckdb.tmp").rglob("*") if f.is_file()
    )
    assert spilled <= 20 << 20
    status, res, _ = await sql(
        gw, "SELECT count(*) FROM (SELECT range FROM range(100000) ORDER BY random())"
    )
    assert status == 200 and res["rows"] == [[100000]]


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def load(client: Any, n: int, concurrency: int = 4) -> list[float]:
    """Latencies (s) of ``n`` chat completions through the gateway, ``concurrency`` at a time."""
    latencies: list[float] = []
    queue = list(range(n))

    async def worker() -> None:
        while queue:
            queue.pop()
            t0 = time.perf_counter()
            await client.chat.completions.create(model="gpt-5.4-mini", messages=MSG)
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def test_hostile_queries_block_nothing_else(make_gateway: Any, tmp_path: Path) -> None:
    # a long limit: the two running queries last the whole load, then their clients leave
    gw = await make_gateway(chain(tmp_path, query_timeout="30s", query_concurrency=2))
    client = gw.openai(await gw.create_key("lu", "pro"))
    await load(client, 20)  # warm up
    baseline = await load(client, 150)

    hostile = [asyncio.create_task(sql(gw, HOSTILE)) for _ in range(8)]
    await until(lambda: analytics(gw)._queries_running == 2, 2.0)
    await until(lambda: sum(t.done() for t in hostile) == 6, 2.0)  # over the cap: refused
    refused = [t.result() for t in hostile if t.done()]
    assert all(s == 429 and r["error"]["code"] == "too_many_queries" for s, r, _ in refused)
    t0 = time.perf_counter()
    # the loop's default executor (quota persistence, key files) is not theirs: it answers
    await asyncio.wait_for(asyncio.to_thread(lambda: None), 0.5)
    # another admin query gets the cap's answer at once; invoices and health are served
    status, res, took = await sql(gw, "SELECT count(*) FROM usage")
    assert status == 429 and res["error"]["code"] == "too_many_queries" and took < 1.0, res
    month = datetime.now(UTC).strftime("%Y-%m")
    async with gw.http.get(
        f"{gw.url}/admin/invoices/lu", params={"month": month}, headers=ADMIN
    ) as r:
        assert r.status == 200 and (await r.json())["lines"][1]["quantity"] == 170
    async with gw.http.get(f"{gw.url}/healthz") as r:
        assert r.status == 200
    assert time.perf_counter() - t0 < 2.0
    under_attack = await load(client, 150)
    assert analytics(gw)._queries_running == 2, "the hostile queries ran during the load"
    for t in hostile:
        t.cancel()  # their clients leave: the queries are interrupted
    await until(lambda: not analytics(gw).busy, 2.0)

    # a busy 2-core machine: the bound leaves room for noise, not for a core taken away
    base, attacked = p99(baseline), p99(under_attack)
    assert attacked < max(3 * base, base + 0.05), (base, attacked)
    # and the rows of that load were loaded meanwhile (a query sees every answered request)
    status, res, _ = await sql(gw, "SELECT count(*) FROM usage WHERE user_id = 'lu'")
    assert status == 200 and res["rows"] == [[320]]


async def test_closing_the_store_interrupts_running_queries(
    make_gateway: Any, tmp_path: Path
) -> None:
    gw = await make_gateway(chain(tmp_path, query_timeout="60s"))
    running = asyncio.create_task(sql(gw, HOSTILE))
    await until(lambda: analytics(gw).busy, 2.0)
    t0 = time.perf_counter()
    await gw.app[RESOURCES].close()  # what the gateway's shutdown runs
    assert time.perf_counter() - t0 < 2.0
    status, res, took = await running
    assert status == 400 and res["error"]["code"] == "query_timeout" and took < 5.0
    assert not analytics(gw).busy


async def test_a_shutdown_stops_queries_when_it_begins(make_gateway: Any, tmp_path: Path) -> None:
    """``Resources.on_shutdown``, which the metering plugin registers with: the running query
    answers 503 at once, and the admin plane takes no new one while requests drain."""
    gw = await make_gateway(chain(tmp_path, query_timeout="60s"))
    running = asyncio.create_task(sql(gw, HOSTILE))
    await until(lambda: analytics(gw).busy, 2.0)
    await gw.app[RESOURCES].shutdown()  # what aiohttp's on_shutdown runs, before handlers drain
    status, res, took = await running
    assert status == 503 and res["error"]["code"] == "shutting_down", res
    assert took < 5.0 and not analytics(gw).busy
    status, res, _ = await sql(gw, "SELECT 1")
    assert status == 503 and res["error"]["code"] == "shutting_down"
    async with gw.http.get(
        f"{gw.url}/admin/invoices/ann", params={"month": "2026-01"}, headers=ADMIN
    ) as r:
        assert r.status == 503 and (await r.json())["error"]["code"] == "shutting_down"


def test_the_limits_are_validated() -> None:
    for config, field in (
        ("{query_timeout: soon}", "query_timeout"),
        ("{query_concurrency: 0}", "query_concurrency"),
        ("{query_max_rows: 0}", "query_max_rows"),
        ("{query_memory_limit: lots}", "query_memory_limit"),
        ("{temp_limit: 1}", "temp_limit"),
        ("{database: data/usage.duckdb, export_dir: data}", "export_dir"),  # holds keys.json
    ):
        assert field in config_error("metering", config), config


SERVE_POLICY = """\
version: 1
listen: {{host: 127.0.0.1, port: {port}, shutdown_timeout: 6s}}
admin: {{key: {admin}}}
state: {{dir: null}}
providers:
  openai: {{kind: openai, base_url: "http://127.0.0.1:9/v1", api_key: k}}
models:
  gpt-5.4-mini: {{provider: openai}}
chain:
  - name: metering
    config: {{database: {db}, query_timeout: 60s, export_dir: {exports}}}
"""


def test_sigterm_exits_promptly_while_a_query_runs(tmp_path: Path) -> None:
    """The real ``tollway serve``: a query with a minute left does not hold up SIGTERM.

    It is stopped when the shutdown begins and answered (503), not left to run until its
    handler is cancelled after half the 6 s ``shutdown_timeout``."""
    port = free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        SERVE_POLICY.format(
            port=port, admin=ADMIN_KEY, db=tmp_path / "u.duckdb", exports=tmp_path / "x"
        )
    )
    answers: list[int] = []
    codes: list[str] = []

    def hostile() -> None:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/admin/sql",
            data=orjson.dumps({"query": HOSTILE}),
            headers={**ADMIN, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                answers.append(r.status)
        except urllib.error.HTTPError as e:
            answers.append(e.code)
            codes.append(orjson.loads(e.read())["error"]["code"])
        except OSError:
            answers.append(0)  # the connection closed at shutdown: also not hanging

    with running([*TOLLWAY, "serve", "--policy", str(policy)], "tollway listening") as gw:
        client = threading.Thread(target=hostile)
        client.start()
        time.sleep(1.0)  # the query is running
        assert client.is_alive() and not answers
        t0 = time.perf_counter()
        gw.popen.send_signal(signal.SIGTERM)
        gw.popen.wait(15)
        took = time.perf_counter() - t0
        client.join(5)
    # exit 0: a clean stop, not the watchdog that ends a shutdown stuck past 2 x 6 s
    assert gw.popen.returncode == 0 and "took longer" not in gw.text(), gw.text()
    assert took < 2.0, took  # not the 3 s an in-flight request gets before it is cancelled
    assert answers == [503] and codes == ["shutting_down"], (answers, codes)
