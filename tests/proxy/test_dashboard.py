"""The live dashboard, rendered by a real headless Chromium against a running gateway, and the
/admin/stats it shows (with the autoscaling signals)."""

from __future__ import annotations

import asyncio
import html
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.dashboard import scaling
from proxy.figures import Card, Chart, Figures, Series
from proxy.hookspecs import hookimpl
from tests.browser import HEADLESS, chromium, need_chromium, png_pixels
from tests.conftest import ADMIN_KEY, Gw

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def chain(db: Path) -> str:
    return (
        "chain:\n  - name: auth\n  - name: limits\n    config: {}\n"
        "  - name: cache\n    config: {default_ttl: 1h}\n"
        f"  - name: metering\n    config: {{database: {db}}}\n"
    )


async def render(url: str, profile: Path) -> str:
    """The page's DOM after its script ran (Chromium's virtual time lets two polls happen)."""
    proc = await asyncio.create_subprocess_exec(
        need_chromium(),
        *HEADLESS,
        f"--user-data-dir={profile}",
        "--virtual-time-budget=12000",  # two polls, five seconds apart
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


# ---- history charts: a plugin's Chart values, drawn as SVG by the page --------------------

HOUR = 1_780_002_000.0  # a fixed start on an hour boundary: the time labels are known (UTC)
BASE_HOUR: list[float | None] = [3, 7.5, None, 12, 0, 4.25, None, None, 9, 142.857, 2, 5]
BASE_DAY: list[float | None] = [None, 1.5, 40, 12.25, None, 3, 0.5, 97.5]


def shifted(values: list[float | None], n: int) -> list[float | None]:
    return [None if v is None else v + n * 1.5 for v in values]


def figures(n: int) -> Figures:
    """What the test plugin returns at its ``n``-th call: every value moves with ``n``."""
    hour = [HOUR + 300 * i for i in range(len(BASE_HOUR))]
    day = [HOUR + 3 * 3600 * i for i in range(len(BASE_DAY))]
    return Figures(
        cards=(Card("chart_polls", "chart polls", n),),
        charts=(
            Chart(
                "rpm_hour",
                "Requests per minute",
                "hour",
                300,
                hour,
                (
                    Series("requests", shifted(BASE_HOUR, n)),
                    Series("errors", [v if v is None else v / 10 for v in BASE_HOUR]),
                ),
            ),
            Chart(
                "latency_hour", "Latency p95", "hour", 300, hour, (Series("p95", BASE_HOUR),), "ms"
            ),
            Chart(
                "errors_day",
                "Error rate",
                "day",
                10800,
                day,
                (Series("5xx", shifted(BASE_DAY, n)),),
                "percent",
            ),
            Chart("broken", "Broken", "hour", 300, hour, (Series("x", [1.0, 2.0]),)),
            Chart("requests", "Takes a core id", "hour", 300, hour[:1], (Series("x", [1.0]),)),
        ),
    )


class ChartsPlugin:
    """A plugin contributing charts through the public hook; its values change at each poll."""

    def __init__(self, config: Any, policy: Any) -> None:
        self.polls = 0

    @hookimpl
    async def dashboard_figures(self) -> Figures:
        self.polls += 1
        return figures(self.polls)


SHOWN = [("rpm_hour", "hour"), ("latency_hour", "hour"), ("errors_day", "day")]

DRAWN = """(() => ({
  polls: Number(document.getElementById("chart_polls")?.textContent),
  nodes: document.getElementsByTagName("*").length,
  charts: Object.fromEntries([...document.querySelectorAll("#chart_list figure")].map((f) => [
    f.id, {
      hidden: f.hidden,
      points: [...f.querySelectorAll("circle")].map(
        (c) => [c.dataset.series, Number(c.dataset.t), Number(c.dataset.v)]),
      labels: [...f.querySelectorAll("text")].map((t) => t.textContent),
      legend: [...f.querySelectorAll(".legend span")].map((s) => s.textContent),
    }])),
}))()"""


def expected(n: int) -> dict[str, Any]:
    """Each chart's points as the page must draw them: a dot per non-null value, in order."""
    out = {}
    for chart in figures(n).charts:
        if chart.name in dict(SHOWN):
            out[chart.name] = [
                [s.label, t, v]
                for s in chart.series
                for t, v in zip(chart.times, s.values, strict=True)
                if v is not None
            ]
    return out


def points(drawn: dict[str, Any]) -> dict[str, Any]:
    return {name: c["points"] for name, c in drawn["charts"].items()}


async def test_history_charts_in_chromium(
    make_gateway: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gw: Gw = await make_gateway(
        "chain:\n  - name: auth\n  - name: charts\n", extra_plugins={"charts": ChartsPlugin}
    )
    s = await stats(gw)  # the plugin's call 1
    assert [c["name"] for c in s["charts"]] == [name for name, _ in SHOWN]
    assert s["charts"][0]["series"][0] == {"label": "requests", "values": shifted(BASE_HOUR, 1)}
    assert "dashboard chart 'broken' dropped: series 'x'" in caplog.text  # the rest is shown

    async with chromium(tmp_path / "profile") as page:
        await page.viewport(1200, 1100, timezone="UTC")
        await page.goto(f"{gw.url}/dashboard#key={ADMIN_KEY}")
        await page.until("!!document.querySelector('#rpm_hour circle')")
        first = await page.eval(DRAWN)
        n = first["polls"]
        assert n >= 2 and points(first) == expected(n)  # drawn exactly as received
        assert {name: c["hidden"] for name, c in first["charts"].items()} == {
            name: window != "hour" for name, window in SHOWN
        }
        assert first["charts"]["rpm_hour"]["legend"] == ["requests", "errors"]
        # y axis: the maximum rounded up to a round number (145.857... -> 200), its half and
        # 0, by the chart's format; time axis: the first and last point and round times between
        assert first["charts"]["rpm_hour"]["labels"] == [
            "200",
            "100",
            "0",
            "21:00",
            "21:10",
            "21:20",
            "21:30",
            "21:40",
            "21:55",
        ]
        assert first["charts"]["latency_hour"]["labels"][:3] == ["200 ms", "100 ms", "0 ms"]
        assert first["charts"]["errors_day"]["labels"][:3] == ["200 %", "100 %", "0 %"]  # n >= 2
        assert not await page.eval("document.getElementById('requests').parentElement.hidden")

        png = await page.screenshot()
        shot = tmp_path / "dashboard-hour.png"
        shot.write_bytes(png)
        print(f"dashboard screenshot: {shot}")
        box = await page.box("#rpm_hour svg")
        width, height, rows = png_pixels(png)
        assert (width, height) == (1200, 1100)
        inside = [
            px
            for row in rows[int(box["y"]) : int(box["y"] + box["height"])]
            for px in row[int(box["x"]) : int(box["x"] + box["width"])]
        ]
        assert len(set(inside)) > 20  # lines, dots, labels and their antialiasing: not blank
        drawn = [px for px in inside if px != (255, 255, 255)]
        assert 0.02 < len(drawn) / len(inside) < 0.5
        blue, orange = (0x2F, 0x6F, 0xDE), (0xE0, 0x7B, 0x16)  # the two series' colours
        assert sum(px == blue for px in inside) > 50 and sum(px == orange for px in inside) > 50

        # the other window: day charts shown, hour ones hidden, the choice kept for the tab
        await page.eval("document.querySelector('#chart_windows [data-window=day]').click()")
        day = await page.eval(DRAWN)
        assert {name: c["hidden"] for name, c in day["charts"].items()} == {
            name: window != "day" for name, window in SHOWN
        }
        assert (await page.box("#errors_day svg"))["height"] > 100
        assert (
            await page.eval("document.getElementById('rpm_hour').getBoundingClientRect().height")
            == 0
        )
        assert await page.eval("sessionStorage.getItem('tollway-window')") == "day"
        assert (
            await page.eval("document.querySelector('[aria-pressed=true]').textContent")
            == "last day"
        )
        (tmp_path / "dashboard-day.png").write_bytes(await page.screenshot())

        # the next poll brings new values: redrawn, same number of nodes, window unchanged
        await page.until(f"Number(document.getElementById('chart_polls').textContent) > {n}", 10)
        second = await page.eval(DRAWN)
        assert second["polls"] > n and points(second) == expected(second["polls"])
        assert second["nodes"] == first["nodes"]
        assert (
            not second["charts"]["errors_day"]["hidden"] and second["charts"]["rpm_hour"]["hidden"]
        )

        # an answer with only plugin figures (a process without the gateway's counters)
        only = orjson.dumps(
            {"time": 1.0, "cards": [], "charts": [asdict(c) for c in figures(50).charts[:3]]}
        )
        alone = await page.eval(
            f"(() => {{ render({only.decode()}); const d = {DRAWN};"
            " d.core = ['requests', 'rps', 'recommendation', 'by_status']"
            ".map((id) => document.getElementById(id).closest('.card, section').hidden);"
            " d.state = document.getElementById('state').textContent; return d; })()"
        )
        assert points(alone) == expected(50) and alone["core"] == [True] * 4
        assert alone["state"] == "live"

        # a new page load in the same tab remembers the window
        await page.goto(f"{gw.url}/dashboard")
        await page.until("!!document.querySelector('#errors_day circle')")
        assert await page.eval("document.getElementById('latency_hour').hidden")
