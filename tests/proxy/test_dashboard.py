"""The live dashboard, rendered by a real headless Chromium against a running gateway, and the
/admin/stats it shows (with the autoscaling signals)."""

from __future__ import annotations

import asyncio
import html
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from proxy.dashboard import scaling
from tests.conftest import ADMIN_KEY, Gw

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chain(db: Path) -> str:
    return (
        "chain:\n  - name: auth\n  - name: limits\n    config: {}\n"
        "  - name: cache\n    config: {default_ttl: 1h}\n"
        f"  - name: metering\n    config: {{database: {db}}}\n"
    )


async def render(url: str, profile: Path) -> str:
    """The page's DOM after its script ran (Chromium's virtual time lets two polls happen)."""
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no chromium (apt-get install chromium)")
        pytest.skip("no chromium")
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return out.decode()


def text_of(dom: str, element_id: str) -> str:
    m = re.search(rf'id="{element_id}"[^>]*>(.*?)</', dom, re.S)
    assert m, f"no #{element_id} in the page"
    return html.unescape(m.group(1)).strip()


async def stats(gw: Gw) -> dict[str, Any]:
    async with gw.http.get(f"{gw.url}/admin/stats", headers=ADMIN) as r:
        assert r.status == 200
        return await r.json()  # type: ignore[no-any-return]


async def test_dashboard_in_chromium(make_gateway: Any, tmp_path: Path) -> None:
    gw: Gw = await make_gateway(chain(tmp_path / "usage.duckdb"))
    ann, bob = await gw.create_key("ann"), await gw.create_key("bob")
    for key, text in ((ann, "one"), (ann, "one"), (ann, "two"), (bob, "three")):
        await gw.openai(key).chat.completions.create(
            model="gpt-5.4-mini", messages=[{"role": "user", "content": text}]
        )
    s = await stats(gw)
    assert s["requests"] == 4 and s["cache"] == {"miss": 3, "hit": 1}
    assert s["cache_hit_rate"] == 25.0 and s["error_rate"] == 0.0
    assert s["plugins"]["tollway_cache_hits"] == 1
    assert [u["user_id"] for u in s["usage"]["top_users"]] == ["ann", "bob"]
    business = s["usage"]["business"]
    async with gw.http.post(
        f"{gw.url}/admin/sql",
        json={"query": "SELECT sum(price_usd) FROM usage"},
        headers=ADMIN,
    ) as r:
        usage_revenue = float((await r.json())["rows"][0][0])
    assert float(business["revenue_usd"]) == pytest.approx(usage_revenue + 2 * 29)  # two pro users

    dom = await render(f"{gw.url}/dashboard#key={ADMIN_KEY}", tmp_path / "profile")
    assert text_of(dom, "state").startswith("live · chain: auth, limits, cache, metering")
    assert text_of(dom, "requests") == "4"
    assert text_of(dom, "rps") != "-"  # a second poll happened: the rate is a difference
    assert text_of(dom, "cache_hit_rate") == "25.0 %"
    assert text_of(dom, "error_rate") == "0 %"
    assert text_of(dom, "revenue_usd") == f"${float(business['revenue_usd']):.2f}"
    assert text_of(dom, "mrr_usd") == "$58.00"
    assert text_of(dom, "active_users") == "2"
    assert text_of(dom, "recommendation") in ("steady", "scale down", "scale up")
    users = re.search(r'<tbody id="top_users">(.*?)</tbody>', dom, re.S)
    assert users and re.findall(r"<td>([^<]*)</td>", users.group(1))[:2] == ["ann", "3"]
    statuses = re.search(r'<tbody id="by_status">(.*?)</tbody>', dom, re.S)
    assert statuses and re.findall(r"<td>([^<]*)</td>", statuses.group(1)) == ["2xx", "4"]


async def test_dashboard_needs_the_admin_key(make_gateway: Any, tmp_path: Path) -> None:
    gw: Gw = await make_gateway(chain(tmp_path / "usage.duckdb"))
    await gw.openai(await gw.create_key("ann")).chat.completions.create(
        model="gpt-5.4-mini", messages=[{"role": "user", "content": "hello"}]
    )
    async with gw.http.get(f"{gw.url}/dashboard") as r:
        page = await r.text()
        assert r.status == 200 and "connect-src 'self'" in r.headers["Content-Security-Policy"]
    assert "ann" not in page  # the page holds no data; it fetches it with the key
    async with gw.http.get(f"{gw.url}/admin/stats") as r:
        assert r.status == 401
    dom = await render(f"{gw.url}/dashboard", tmp_path / "p1")
    assert text_of(dom, "state") == "admin key needed" and text_of(dom, "requests") == "-"
    assert '<form id="login">' in dom  # shown, no longer hidden
    dom = await render(f"{gw.url}/dashboard#key=wrong", tmp_path / "p2")
    assert text_of(dom, "state") == "admin key refused"


def test_scaling_advice() -> None:
    assert scaling(80, 100, 3, 0)["recommendation"] == "scale_up"
    assert scaling(50, 100, 3, 60)["recommendation"] == "scale_up"
    assert scaling(50, 450, 3, 0)["recommendation"] == "scale_up"  # 88 % of 512 MB
    assert scaling(10, 100, 0, 0)["recommendation"] == "scale_down"
    assert scaling(50, 100, 3, 0)["recommendation"] == "steady"
    assert scaling(10, 100, 0, 10)["recommendation"] == "steady"
