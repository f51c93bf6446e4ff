"""Issue 11, items 8 and 7 (export): exports are written only under ``export_dir``.

``POST /admin/export`` names a folder relative to the metering ``export_dir``. Absolute
paths, ``..`` and symlinks that lead out are refused with a 400 in the OpenAI error shape and
write nothing; a name of an existing file is a 400 too, never a 500. The database itself may
write nowhere else, whatever asks it.
"""

from __future__ import annotations

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
MSG = [{"role": "user", "content": "export me"}]
tollway = partial(run_tollway, env={"TOLLWAY_ADMIN_KEY": ADMIN_KEY})


@pytest.fixture
async def metered(make_gateway: Any, tmp_path: Path) -> Gw:
    gw: Gw = await make_gateway(
        "chain:\n  - name: auth\n  - name: metering\n"
        f"    config: {{database: {tmp_path / 'usage.duckdb'}, flush_interval: 50ms, "
        f"export_dir: {tmp_path / 'exports'}}}\n"
    )
    client = gw.openai(await gw.create_key("eve", "pro"))
    for _ in range(2):
        await client.chat.completions.create(model="gpt-5.4-mini", messages=MSG)  # type: ignore[arg-type]
    return gw


async def export(gw: Gw, folder: Any) -> tuple[int, Any]:
    async with gw.http.post(f"{gw.url}/admin/export", json={"dir": folder}, headers=ADMIN) as r:
        return r.status, await r.json()


def parquet(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.parquet")) if folder.exists() else []


async def test_exports_stay_under_the_export_dir(metered: Gw, tmp_path: Path) -> None:
    gw = metered
    exports, outside = tmp_path / "exports", tmp_path / "outside"
    exports.mkdir()
    outside.mkdir()
    (exports / "out").symlink_to(outside)  # a symlink that leads out
    (exports / "real").mkdir()
    (exports / "alias").symlink_to(exports / "real")  # one that stays inside
    (exports / "report.csv").write_text("not a folder")
    for name in (
        "/etc",
        str(outside),
        str(exports / "abs"),  # absolute even where it points inside
        "../outside",
        "nightly/../../outside",
        "a/../b",
        "~root",
        "out",
        "out/nested",
        "report.csv",  # an existing file (was a 500)
        "report.csv/sub",
        ".",
        "bad\x00name",
    ):
        status, res = await export(gw, name)
        assert status == 400, (name, status, res)
        assert set(res["error"]) == {"message", "type", "param", "code"}, res
        assert res["error"]["param"] == "dir" and res["error"]["code"] == "invalid_request"
    assert list(outside.iterdir()) == [] and not list(Path("/etc").glob("day=*"))
    assert (exports / "report.csv").read_text() == "not a folder"
    for bad in (None, 7, ["a"], ""):
        status, res = await export(gw, bad)
        assert status == 400 and res["error"]["param"] == "dir"

    # the same request with a name under the export directory writes Parquet there
    status, res = await export(gw, "nightly/2026-01")
    assert status == 200, res
    target = exports / "nightly" / "2026-01"
    assert res == {"dir": "nightly/2026-01", "path": str(target), "rows": 2}
    assert parquet(target) and all(p.parent.name.startswith("day=") for p in parquet(target))
    status, res = await export(gw, "alias/x")  # a symlink inside the directory is fine
    assert status == 200 and res["path"] == str(exports / "real" / "x")
    assert parquet(exports / "real" / "x")


async def test_the_database_writes_nowhere_else(metered: Gw, tmp_path: Path) -> None:
    """The sandbox beneath the path check: the gateway's database refuses a folder outside
    the export directory even when its own export code is asked directly."""
    store = metered.app[RESOURCES].find(_STORE)
    assert store is not None and store.db is not None
    await store.flush()  # the rows are in the database, as an export through the API sees them
    with pytest.raises(duckdb.PermissionException):
        store.db.export_parquet(tmp_path / "elsewhere")
    assert parquet(tmp_path / "elsewhere") == []
    assert store.db.export_parquet(tmp_path / "exports" / "direct") == 2  # the path itself works


async def test_tollway_export_names_a_folder_under_the_export_dir(
    metered: Gw, tmp_path: Path
) -> None:
    code, out = await tollway("export", "--url", metered.url, "--parquet", "weekly")
    assert code == 0, out
    assert f"exported 2 rows to {tmp_path / 'exports' / 'weekly'}" in out
    assert parquet(tmp_path / "exports" / "weekly")
    code, out = await tollway("export", "--url", metered.url, "--parquet", str(tmp_path / "x"))
    assert code != 0 and "400" in out and "absolute" in out
    assert not (tmp_path / "x").exists()
