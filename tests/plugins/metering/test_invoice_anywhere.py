"""An invoice with overage is the same whichever process renders it: the gateway that owns its
database, ``tollway meter`` for gateways with ``sink: redis`` (its tiers' terms from its
``--policy``), and ``tollway invoice --db`` on either database file once its process stopped
(the terms the last run recorded in the file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from tests.conftest import ADMIN_KEY, GatewayFactory, Gw, policy, policy_text
from tests.plugins.metering.conftest import running_meter
from tests.procs import run_tollway, until

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
MSG = [{"role": "user", "content": "hello there, how are you"}]
TIERS = {
    "pro": {
        "requests_per_month": 3,
        "monthly_cost": 29,
        "overage": {"price_per_request": 0.25, "price_per_mtok": 1000},
    }
}


def chain(db: Path, sink: str) -> list[dict[str, Any]]:
    metering = {"database": str(db), "spool_dir": str(db.with_suffix(".spool")), "sink": sink}
    return [
        {"name": "auth"},
        {"name": "limits", "config": {}},
        {"name": "metering", "config": {**metering, "flush_interval": "50ms"}},
    ]


async def invoice(gw: Gw, site: str, month: str) -> dict[str, Any]:
    async with gw.http.get(
        f"{site}/admin/invoices/olga", params={"month": month}, headers=AUTH
    ) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def offline(db: Path, month: str) -> dict[str, Any]:
    code, out = await run_tollway("invoice", "--db", str(db), "--user", "olga", "--month", month)
    assert code == 0, out
    return dict(orjson.loads(out))


async def rows(gw: Gw, site: str) -> int:
    async with gw.http.post(
        f"{site}/admin/sql", json={"query": "SELECT count(*) FROM usage"}, headers=AUTH
    ) as r:
        return int((await r.json())["rows"][0][0])


async def spend(gw: Gw) -> None:
    """Five requests of a plan with three included: two billed as overage."""
    client = gw.openai(await gw.create_key("olga", "pro"))
    for _ in range(5):
        await client.chat.completions.create(model="gpt-5.4-mini", messages=MSG)  # type: ignore[arg-type]


async def test_gateway_meter_and_offline_invoices_agree_on_overage(
    make_gateway: GatewayFactory, redis_url: str, tmp_path: Path
) -> None:
    # one gateway that owns its database
    local = await make_gateway(chain(tmp_path / "local.duckdb", "duckdb"), base=policy(tiers=TIERS))
    await spend(local)
    # the same traffic through a gateway that ships its rows to a meter (sink redis)
    shipped = policy(tiers=TIERS, state={"url": redis_url, "dir": str(tmp_path / "state")})
    meter_db = tmp_path / "meter.duckdb"
    meter_policy = policy_text({**shipped, "chain": chain(meter_db, "redis")}, emu="http://x")
    async with running_meter(meter_policy) as (site, _):
        remote = await make_gateway(chain(tmp_path / "gw.duckdb", "redis"), base=shipped)
        await spend(remote)
        await until(lambda: _count(remote, site, 5), what="all five rows in the meter")
        async with local.http.post(
            f"{local.url}/admin/sql", json={"query": "SELECT max(ts) FROM usage"}, headers=AUTH
        ) as r:
            month = str((await r.json())["rows"][0][0])[:7]
        by_gateway = await invoice(local, local.url, month)
        by_meter = await invoice(remote, site, month)
    await local.app.shutdown()
    await local.app.cleanup()  # its database file closed: readable offline

    services = {line["service"]: line["total"] for line in by_gateway["lines"]}
    assert services == {
        "subscription": "29.00",
        "quota": "0.00",
        "overage": "0.50",
        "overage_tokens": services["overage_tokens"],
        "ai_api": "0.05",
    }
    assert float(services["overage_tokens"]) > 0
    assert by_meter == by_gateway
    assert await offline(tmp_path / "local.duckdb", month) == by_gateway
    assert await offline(meter_db, month) == by_gateway


async def _count(gw: Gw, site: str, n: int) -> bool:
    return await rows(gw, site) == n
