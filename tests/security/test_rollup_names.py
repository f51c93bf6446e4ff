"""Names a client makes up do not become rollup keys.

The feature (``X-Tollway-Feature``) and the model (the JSON body) are the client's text. A
request naming a feature or model the policy does not know is refused before any rate limit
counts it, and its usage row keeps the name sent; the dashboard's minute and day tables count
it under one ``''`` key, else a key holder could add a row of up to a body's size to each per
request, and the page's month queries would grow with such requests instead of with time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import ADMIN_KEY, Gw

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MADE_UP = 25


def chain(db: Path) -> str:
    return (
        "chain:\n  - name: auth\n  - name: limits\n    config: {}\n"
        f"  - name: metering\n    config: {{database: {db}, flush_interval: 1h}}\n"
    )


async def sql(gw: Gw, query: str) -> list[list[Any]]:
    async with gw.http.post(f"{gw.url}/admin/sql", json={"query": query}, headers=ADMIN) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["rows"]  # type: ignore[no-any-return]


async def test_made_up_features_and_models_share_one_rollup_key(
    make_gateway: Any, tmp_path: Path
) -> None:
    gw: Gw = await make_gateway(chain(tmp_path / "usage.duckdb"))
    key = await gw.create_key("ann")
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "hi"}]}
    url = f"{gw.url}/v1/chat/completions"
    for i in range(MADE_UP):
        feature = {"X-Tollway-Feature": f"<svg onload=alert({i})>" + "f" * 2000}
        async with gw.http.post(url, json=body, headers=headers | feature) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "unknown_feature"
        model = {"model": f"made-up-{i}-" + "m" * 2000}
        async with gw.http.post(url, json=body | model, headers=headers) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"
    async with gw.openai(key) as client:
        await client.chat.completions.create(**body)  # type: ignore[call-overload]
    async with gw.http.get(f"{gw.url}/admin/stats", headers=ADMIN) as r:  # loads the rows
        assert r.status == 200
        usage = (await r.json())["usage"]
    # the usage rows keep what was sent
    (sent,) = await sql(gw, "SELECT count(DISTINCT feature), count(DISTINCT model) FROM usage")
    assert sent == [MADE_UP + 1, MADE_UP + 1]
    for table in ("usage_minutes", "usage_days"):
        rows = await sql(gw, f"SELECT feature, model, sum(requests) FROM {table} GROUP BY ALL")
        assert len(rows) <= 3 * 2, (table, len(rows))  # a minute boundary may split them
        names = {(f, m) for f, m, _ in rows}
        assert names <= {
            ("", "gpt-5.4-mini"),
            ("basic_suggestions", ""),
            ("basic_suggestions", "gpt-5.4-mini"),
        }
        assert sum(n for *_, n in rows) == 2 * MADE_UP + 1  # every request still counted
    features = {f["feature"]: f["requests"] for f in usage["top_features"]}
    models = {m["model"]: m["requests"] for m in usage["top_models"]}
    assert features == {None: MADE_UP, "basic_suggestions": MADE_UP + 1}
    assert models == {None: MADE_UP, "gpt-5.4-mini": MADE_UP + 1}
