"""Issue 11, item 1: admin SQL reads the usage database and nothing else.

Every escape found is replayed through ``POST /admin/sql`` (and ``tollway sql``): statements
that write however they are wrapped (EXPLAIN ANALYZE, several statements, COPY, PRAGMA, SET,
ATTACH, INSTALL/LOAD, CALL...) are refused, host files are out of reach, and afterwards the
usage rows are intact and no file was written. The walls are also checked one by one on the
database the gateway opened, so each holds even if another one were to fail.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import duckdb
import pytest

from plugins.metering.plugin import _STORE
from proxy.appkeys import RESOURCES
from tests.conftest import ADMIN_KEY, Gw
from tests.procs import run_tollway

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MSG = [{"role": "user", "content": "hello there"}]
SECRET = "sk-live-should-never-leave-the-host"
tollway = partial(run_tollway, env={"TOLLWAY_ADMIN_KEY": ADMIN_KEY})


def chain(tmp: Path) -> str:
    return (
        "chain:\n  - name: auth\n  - name: metering\n"
        f"    config: {{database: {tmp / 'data' / 'usage.duckdb'}, flush_interval: 50ms, "
        f"export_dir: {tmp / 'exports'}}}\n"
    )


async def sql(gw: Gw, query: str) -> tuple[int, Any]:
    async with gw.http.post(f"{gw.url}/admin/sql", json={"query": query}, headers=ADMIN) as r:
        return r.status, await r.json()


@pytest.fixture
async def metered(make_gateway: Any, tmp_path: Path) -> Gw:
    gw: Gw = await make_gateway(chain(tmp_path))
    client = gw.openai(await gw.create_key("ann", "pro"))
    for _ in range(3):
        await client.chat.completions.create(model="gpt-5.4-mini", messages=MSG)  # type: ignore[arg-type]
    # a keys file beside the database, as the gateway keeps one (state.dir)
    (tmp_path / "data" / "keys.json").write_text(f'[{{"key": "{SECRET}"}}]')
    return gw


async def snapshot(gw: Gw) -> list[Any]:
    status, res = await sql(
        gw, "SELECT request_id, user_id, status, cost_usd, price_usd FROM usage ORDER BY 1"
    )
    assert status == 200, res
    return res["rows"]  # type: ignore[no-any-return]


def files(root: Path) -> set[Path]:
    """The files under ``root``, but the database's own (its WAL comes and goes with loads)."""
    return {p for p in root.rglob("*") if not p.relative_to(root).as_posix().startswith("data/")}


def writes(tmp: Path) -> list[tuple[str, str]]:
    """Statements that would change the database or the host's files, each with a target."""
    t = tmp.as_posix()
    return [
        ("EXPLAIN ANALYZE DELETE FROM usage", ""),
        ("EXPLAIN ANALYZE INSERT INTO usage (ts, request_id) VALUES (now(), 'forged')", ""),
        ("EXPLAIN ANALYZE UPDATE usage SET price_usd = 0", ""),
        (f"EXPLAIN ANALYZE COPY (SELECT 'import os') TO '{t}/evil.pth'", "evil.pth"),
        ("/* hidden */ EXPLAIN /* in */ ANALYSE -- comments\n DELETE FROM usage", ""),
        ("EXPLAIN (ANALYZE) DELETE FROM usage", ""),
        (f"COPY usage TO '{t}/copied.csv'", "copied.csv"),
        (f"COPY (SELECT 1) TO '{t}/exports/x.csv'", "exports/x.csv"),
        (f"EXPORT DATABASE '{t}/dump'", "dump"),
        (f"PRAGMA import_database('{t}/dump')", ""),
        ("PRAGMA enable_profiling", ""),
        (f"ATTACH '{t}/evil.duckdb' AS evil", "evil.duckdb"),
        ("ATTACH ':memory:' AS scratch", ""),
        ("SET enable_external_access = true", ""),
        ("RESET enable_external_access", ""),
        ("SET allowed_directories = ['/']", ""),
        ("SET memory_limit = '100GB'", ""),
        ("INSTALL httpfs", ""),
        ("LOAD httpfs", ""),
        ("CALL checkpoint()", ""),
        ("CREATE TABLE stolen AS SELECT * FROM usage", ""),
        ("CREATE OR REPLACE VIEW kpis AS SELECT 1", ""),
        ("DELETE FROM usage", ""),
        ("SELECT 1; DELETE FROM usage", ""),
        ("SELECT 1; COMMIT; DELETE FROM usage", ""),
        ("USE memory", ""),
    ]


async def test_every_write_is_refused_and_nothing_changes(metered: Gw, tmp_path: Path) -> None:
    gw = metered
    before = await snapshot(gw)
    assert len(before) == 3  # the attack has rows to delete and forge
    on_disk = files(tmp_path)
    for query, target in writes(tmp_path):
        status, res = await sql(gw, query)
        assert status == 403, (query, status, res)
        err = res["error"]
        assert err["code"] == "read_only" and set(err) == {"message", "type", "param", "code"}
        if target:
            assert not (tmp_path / target).exists(), query
    # a data-modifying CTE is not even valid DuckDB: a 400, still nothing done
    status, res = await sql(gw, "WITH d AS (DELETE FROM usage RETURNING *) SELECT * FROM d")
    assert status == 400 and res["error"]["code"] == "sql_error"
    status, res = await sql(gw, "SELECT * FROM query('DELETE FROM usage')")
    assert status == 400 and res["error"]["code"] == "sql_error"
    assert await snapshot(gw) == before
    assert files(tmp_path) == on_disk, files(tmp_path) - on_disk


async def test_host_files_and_the_network_are_out_of_reach(metered: Gw, tmp_path: Path) -> None:
    gw = metered
    keys = tmp_path / "data" / "keys.json"
    env = Path("/proc/self/environ")
    # the attacks are real: an ordinary DuckDB connection reads both files
    plain = duckdb.connect()
    assert SECRET in plain.execute("SELECT content FROM read_text(?)", [str(keys)]).fetchone()[0]
    assert plain.execute("SELECT octet_length(content) FROM read_blob(?)", [str(env)]).fetchone()[0]
    plain.close()
    leaks = [SECRET, ADMIN_KEY, "upstream-secret", os.environ.get("PATH", "/usr/bin")]
    for query in (
        f"SELECT * FROM read_text('{env}')",
        f"SELECT * FROM read_blob('{env}')",
        f"SELECT * FROM read_text('{keys}')",
        f"SELECT * FROM read_csv('{keys}')",
        f"SELECT * FROM read_json('{keys}')",
        f"SELECT * FROM '{keys}'",
        f"SELECT * FROM read_text('{tmp_path}/data/../data/keys.json')",
        f"SELECT * FROM read_text('{tmp_path}/exports/../data/keys.json')",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM glob('/*')",
        f"SELECT * FROM glob('{tmp_path}/**')",
        "SELECT * FROM read_csv('https://example.com/data.csv')",
        "SELECT * FROM duckdb_secrets()",
        "EXPLAIN ANALYZE SELECT * FROM read_text('/proc/self/environ')",
    ):
        async with gw.http.post(f"{gw.url}/admin/sql", json={"query": query}, headers=ADMIN) as r:
            text = await r.text()
            assert r.status == 400, (query, r.status, text)
            assert (await r.json())["error"]["code"] == "sql_error"
        assert not any(secret in text for secret in leaks), query
    # reads of the usage database still work, views and EXPLAIN ANALYZE of a SELECT included
    status, res = await sql(gw, "SELECT requests FROM kpis")
    assert status == 200 and res["rows"] == [[3]]
    status, res = await sql(gw, "EXPLAIN ANALYZE SELECT count(*) FROM usage")
    assert status == 200 and res["columns"] == ["explain_key", "explain_value"]
    status, res = await sql(gw, "DESCRIBE usage")
    assert status == 200 and ["request_id", "VARCHAR"] in [r[:2] for r in res["rows"]]


async def test_each_wall_holds_on_its_own(metered: Gw, tmp_path: Path) -> None:
    """The gateway's database refuses host files and setting changes even to a statement run
    without the parser check, and the query path's transaction refuses writes by itself."""
    store = metered.app[RESOURCES].find(_STORE)
    assert store is not None and store.db is not None
    cur = store.db.con.cursor()  # the gateway's own connection: what a missed check would reach
    try:
        for statement in (
            "SELECT * FROM read_text('/proc/self/environ')",
            f"COPY (SELECT 1) TO '{tmp_path}/direct.csv'",
            f"ATTACH '{tmp_path}/direct.duckdb'",
            "INSTALL httpfs",
        ):
            with pytest.raises(duckdb.PermissionException):
                cur.execute(statement)
        for statement in (
            "SET enable_external_access = true",
            "SET allowed_directories = ['/']",
            "SET autoload_known_extensions = true",
            "SET lock_configuration = false",
        ):
            with pytest.raises(duckdb.InvalidInputException, match="locked"):
                cur.execute(statement)
        cur.execute("BEGIN TRANSACTION READ ONLY")  # what every admin query runs in
        with pytest.raises(duckdb.TransactionException, match="read-only"):
            cur.execute("EXPLAIN ANALYZE DELETE FROM usage")
        cur.execute("ROLLBACK")
    finally:
        cur.close()
    assert not (tmp_path / "direct.csv").exists() and not (tmp_path / "direct.duckdb").exists()
    assert len(await snapshot(metered)) == 3


async def test_tollway_sql_online_and_offline(make_gateway: Any, tmp_path: Path) -> None:
    gw: Gw = await make_gateway(chain(tmp_path))
    client = gw.openai(await gw.create_key("bo", "pro"))
    await client.chat.completions.create(model="gpt-5.4-mini", messages=MSG)  # type: ignore[arg-type]
    code, out = await tollway("sql", "--url", gw.url, "EXPLAIN ANALYZE DELETE FROM usage")
    assert code != 0 and "403" in out and "read_only" in out
    code, out = await tollway("sql", "--url", gw.url, "SELECT count(*) AS n FROM usage")
    assert code == 0 and out.split()[-1] == "1", out

    # stopped: --db opens the file itself, with the same sandbox
    db = tmp_path / "offline.duckdb"
    from plugins.metering.database import UsageDB

    UsageDB(db).close()
    code, out = await tollway("sql", "--db", str(db), "EXPLAIN ANALYZE DELETE FROM usage")
    assert code != 0 and "refused" in out
    code, out = await tollway("sql", "--db", str(db), "SELECT * FROM read_text('/etc/passwd')")
    assert code != 0 and "Permission" in out and "root:" not in out
    code, out = await tollway("sql", "--db", str(db), "SELECT count(*) AS n FROM usage")
    assert code == 0 and out.split()[-1] == "0", out
