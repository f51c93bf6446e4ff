"""The dashboard's history end to end: a gateway that starts with a day of older usage rows in
its spool (as a crashed gateway leaves them), live traffic through the official SDKs, then the
page in a real headless Chromium. Every card, table row and chart point read from the page is
checked against SQL over the raw ``usage`` table, written here and run through the admin API
(``POST /admin/sql``, as an operator would), not against the figures code. Then the same for
the ``tollway meter`` process, which serves the dashboard when the gateways ship their rows to
Redis (``metering.sink: redis``) and keep no database."""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest

from tests.browser import Page, chromium, png_pixels
from tests.conftest import ADMIN_KEY, Gw, policy, policy_text
from tests.plugins.metering.conftest import running_meter
from tests.procs import until

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TIER_COST = {"pro": Decimal(29), "free": Decimal(0)}  # BASE_POLICY's monthly_cost
LATENCY_PRECISION = math.sqrt(1.05) - 1  # the histogram's documented precision (2.5 %)

CARDS = {
    "revenue_today_usd": "money",
    "revenue_usd": "money",
    "provider_cost_today_usd": "money",
    "provider_cost_usd": "money",
    "profit_margin": "percent",
    "mrr_usd": "money",
    "active_users": "count",
    "hour_requests": "count",
    "hour_error_rate": "percent",
    "hour_cache_hit_rate": "percent",
    "hour_p50_ms": "ms",
    "hour_p95_ms": "ms",
    "hour_p99_ms": "ms",
}
TABLES = {  # each table's columns as the page shows them, and their formats
    "top_users": ("text", "count", "count", "money", "money", "text"),
    "top_features": ("text", "count", "money", "money"),
    "top_models": ("text", "count", "money", "money"),
}
CHARTS = {  # (name, window): series
    "requests": ("requests",),
    "error_rate": ("errors",),
    "cache_hit_rate": ("hits",),
    "latency": ("p50", "p95", "p99"),
}
WINDOWS = {"hour": (60, 60), "day": (900, 96)}  # seconds per point, points
ERROR = "(status >= 500 OR error_code LIKE 'upstream%')"  # the documented error definition


def chain(db: Path, spool: Path, sink: str = "duckdb", flush: str = "5s") -> str:
    return (
        "chain:\n  - name: auth\n  - name: limits\n    config: {}\n"
        "  - name: cache\n    config: {default_ttl: 1h}\n"
        "  - name: metering\n"
        f"    config: {{database: {db}, spool_dir: {spool}, sink: {sink}, "
        f"flush_interval: {flush}}}\n"
    )


# ---- a day of older rows, left in the spool by a gateway that died --------------------------

MODELS = {  # model: (provider, endpoint, input and output price per million tokens)
    "gpt-5.4-mini": ("openai", "chat", 0.25, 2.0),
    "claude-sonnet": ("anthropic", "messages", 3.0, 15.0),
    "text-embedding-3-small": ("openai", "embeddings", 0.02, None),
}
OLD_USERS = {"ann": "pro", "bob": "pro", "cat": "free", "dora": "pro", "eve": "free"}


def old_rows(now: float) -> list[dict[str, Any]]:
    """Usage rows as the metering plugin spools them, backdated over the last ~40 hours: some
    in the last hour, some earlier today or yesterday, some before the day chart's window."""
    rnd = random.Random(2026)
    spans = [(60, 3500)] * 40 + [(3600, 6 * 3600)] * 14 + [(6 * 3600, 23 * 3600)] * 14
    spans += [(25 * 3600, 40 * 3600)] * 8
    rows = []
    for i, (low, high) in enumerate(spans):
        user = rnd.choice(["ann"] * 5 + ["bob"] * 3 + ["cat"] * 2 + ["dora", "eve"])
        model = rnd.choice(
            ["gpt-5.4-mini"] * 4 + ["claude-sonnet"] * 2 + ["text-embedding-3-small"]
        )
        provider, endpoint, p_in, p_out = MODELS[model]
        status, error = rnd.choice(
            [(200, None)] * 14 + [(502, "upstream_error"), (429, "rate_limited")]
        )
        cache = rnd.choice(["hit", "miss", "miss", None]) if status == 200 else None
        inp, out = rnd.randrange(10, 900), rnd.randrange(1, 300) if p_out else 0
        latency = 0.4 if cache == "hit" else rnd.lognormvariate(4.5, 0.9)
        rows.append(
            {
                "ts": now - rnd.uniform(low, high),
                "request_id": f"old-{i:04d}",
                "user_id": user,
                "key_id": f"key-{user}",
                "tier": OLD_USERS[user],
                "feature": rnd.choice(
                    ["basic_suggestions"] * 3 + ["code_review", "summaries", None]
                ),
                "endpoint": endpoint,
                "provider": provider,
                "model": model,
                "upstream_model": model,
                "stream": rnd.random() < 0.3,
                "status": status,
                "error_code": error,
                "cache": cache,
                "input_tokens": inp if status == 200 else 0,
                "output_tokens": out if status == 200 else 0,
                "usage_estimated": False,
                "latency_ms": latency,
                "ttfb_ms": latency,
                "input_per_mtok": p_in,
                "output_per_mtok": p_out,
                "price": 0.01 if status < 400 else 0.0,
                "saved_input": inp if cache == "hit" else 0,
                "saved_output": out if cache == "hit" else 0,
                "retries": 0,
                "client_ip_hash": None,
                "shared": None,
                "upstream_request_id": None,
                "labels": None,
            }
        )
    return rows


def leave_in_spool(spool: Path, rows: list[dict[str, Any]]) -> None:
    """A segment of a process that is gone (``OWNER.NNNNNNNNNNNN.jsonl``, its lock free), as
    ``plugins.metering.spool`` writes it: the next gateway there adopts and loads it."""
    spool.mkdir(parents=True)
    (spool / "deadhost-4242-1780000000000.000000000001.jsonl").write_bytes(
        b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in rows)
    )


# ---- live traffic through the official SDKs ------------------------------------------------

ASK = "history please"


async def traffic(gw: Gw) -> int:
    """Plain, streamed and cached requests of both SDKs, an upstream error and a 429 from the
    free tier's 5 requests a minute; the number of requests sent."""
    ann, bob, cat = (
        await gw.create_key("ann"),
        await gw.create_key("bob"),
        await gw.create_key("cat", "free"),
    )
    oai, claude = gw.openai(ann), gw.anthropic(bob)
    for _ in range(2):  # a miss, then a hit
        await oai.chat.completions.create(
            model="gpt-5.4-mini", messages=[{"role": "user", "content": ASK}]
        )
    stream = await oai.chat.completions.create(
        model="gpt-5.4-mini", messages=[{"role": "user", "content": "stream it"}], stream=True
    )
    assert [c async for c in stream]
    await oai.chat.completions.create(
        model="gpt-5.4-mini",
        messages=[{"role": "user", "content": "take your time"}],
        extra_headers={"x-emulator-latency-ms": "120"},
    )
    for _ in range(2):
        await claude.messages.create(
            model="claude-sonnet", max_tokens=40, messages=[{"role": "user", "content": ASK}]
        )
    async with claude.messages.stream(
        model="claude-sonnet", max_tokens=40, messages=[{"role": "user", "content": "flow"}]
    ) as s:
        assert await s.get_final_message()
    with pytest.raises(anthropic.InternalServerError):
        await claude.messages.create(
            model="claude-sonnet",
            max_tokens=40,
            messages=[{"role": "user", "content": "fail"}],
            extra_headers={"x-emulator-status": "500"},
        )
    free = gw.openai(cat)
    for i in range(5):
        await free.chat.completions.create(
            model="gpt-5.4-mini", messages=[{"role": "user", "content": f"free {i}"}]
        )
    with pytest.raises(openai.RateLimitError):
        await free.chat.completions.create(
            model="gpt-5.4-mini", messages=[{"role": "user", "content": ASK}]
        )
    return 4 + 4 + 6  # openai, anthropic, the free tier's


# ---- what SQL over the raw usage table says ------------------------------------------------


async def sql(gw_http: Any, url: str, query: str) -> list[list[Any]]:
    async with gw_http.post(f"{url}/admin/sql", json={"query": query}, headers=ADMIN) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["rows"]  # type: ignore[no-any-return]


def num(v: Any) -> float | None:
    return None if v is None else float(Decimal(str(v)))


async def truth(http: Any, url: str, now_minute: float) -> dict[str, Any]:
    """Every figure of the page at ``now_minute`` (the start of the minute the figures were
    computed in), from SQL over ``usage`` alone."""
    today = datetime.fromtimestamp(now_minute, UTC).date()
    month = today.replace(day=1)
    in_month = f"ts >= DATE '{month}'"
    is_today = f"CAST(ts AS DATE) = DATE '{today}'"
    charts: dict[str, list[list[Any]]] = {}
    hour: dict[str, Any] = {}
    for window, (step, points) in WINDOWS.items():
        last = math.floor(now_minute / step) * step
        first = last - (points - 1) * step
        rows = await sql(
            http,
            url,
            f"""SELECT CAST(floor(epoch(ts) / {step}) AS BIGINT) * {step}, count(*),
                       count(*) FILTER (WHERE {ERROR}),
                       count(*) FILTER (WHERE cache = 'hit'),
                       count(*) FILTER (WHERE cache IN ('hit', 'miss')),
                       quantile_disc(latency_ms, [0.5, 0.95, 0.99]) FILTER (WHERE status < 400)
                FROM usage WHERE epoch(ts) >= {first} AND epoch(ts) < {now_minute + 60}
                GROUP BY 1""",
        )
        by_t = {float(r[0]): r[1:] for r in rows}
        series: dict[str, list[list[Any]]] = {s: [] for c in CHARTS.values() for s in c}
        for i in range(points):
            t = float(first + i * step)
            n, err, hits, lookups, q = by_t.get(t, (0, 0, 0, 0, None))
            minutes = min(step, now_minute - t + 60) / 60  # the minutes of the point that began
            series["requests"].append(["requests", t, n / minutes])
            if n:
                series["errors"].append(["errors", t, 100.0 * err / n])
            if lookups:
                series["hits"].append(["hits", t, 100.0 * hits / lookups])
            for label, v in zip(("p50", "p95", "p99"), q or (), strict=False):
                if v is not None:
                    series[label].append([label, t, v])
        for name, labels in CHARTS.items():
            charts[f"{name}_{window}"] = [p for label in labels for p in series[label]]
        if window == "hour":
            [whole] = await sql(
                http,
                url,
                f"""SELECT count(*), count(*) FILTER (WHERE {ERROR}),
                           count(*) FILTER (WHERE cache = 'hit'),
                           count(*) FILTER (WHERE cache IN ('hit', 'miss')),
                           quantile_disc(latency_ms, [0.5, 0.95, 0.99])
                               FILTER (WHERE status < 400)
                    FROM usage WHERE epoch(ts) >= {first}""",
            )
            n, err, hits, lookups, q = whole
            hour = {
                "hour_requests": n,
                "hour_error_rate": 100.0 * err / n if n else None,
                "hour_cache_hit_rate": 100.0 * hits / lookups if lookups else None,
                **dict(
                    zip(("hour_p50_ms", "hour_p95_ms", "hour_p99_ms"), q or [None] * 3, strict=True)
                ),
            }
    [money] = await sql(
        http,
        url,
        f"""SELECT coalesce(sum(price_usd) FILTER (WHERE {is_today}), 0),
                   coalesce(sum(price_usd), 0),
                   coalesce(sum(cost_usd) FILTER (WHERE {is_today}), 0),
                   coalesce(sum(cost_usd), 0)
            FROM usage WHERE {in_month}""",
    )
    today_revenue, usage_revenue, today_cost, cost = (Decimal(str(v)) for v in money)
    tiers = await sql(
        http,
        url,
        f"SELECT user_id, arg_max(tier, ts) FROM usage WHERE {in_month} AND user_id IS NOT NULL "
        "GROUP BY user_id",
    )
    mrr = sum((TIER_COST.get(tier or "", Decimal(0)) for _, tier in tiers), Decimal(0))
    revenue = usage_revenue + mrr
    cards = {
        "revenue_today_usd": today_revenue,
        "revenue_usd": revenue,
        "provider_cost_today_usd": today_cost,
        "provider_cost_usd": cost,
        "profit_margin": 100 * (revenue - cost) / revenue if revenue > 0 else None,
        "mrr_usd": mrr,
        "active_users": len(tiers),
        **hour,
    }
    users = await sql(
        http,
        url,
        f"""SELECT user_id, count(*) AS n, count(*) FILTER (WHERE {is_today}),
                   coalesce(sum(price_usd), 0), coalesce(sum(cost_usd), 0),
                   nullif(arg_max(tier, ts), '')
            FROM usage WHERE {in_month} AND user_id IS NOT NULL
            GROUP BY user_id ORDER BY n DESC, user_id LIMIT 10""",
    )
    tables: dict[str, list[list[Any]]] = {"top_users": users}
    for key in ("feature", "model"):
        tables[f"top_{key}s"] = await sql(
            http,
            url,
            f"""SELECT {key}, count(*) AS n, coalesce(sum(price_usd), 0),
                       coalesce(sum(cost_usd), 0)
                FROM usage WHERE {in_month} GROUP BY {key} ORDER BY n DESC LIMIT 10""",
        )
    return {"cards": {k: num(v) for k, v in cards.items()}, "tables": tables, "charts": charts}


# ---- what the page drew, and the comparison ------------------------------------------------

READ = """(() => ({
  pressed: [...document.querySelectorAll('#chart_windows button')].map(
    (b) => [b.textContent, b.getAttribute('aria-pressed')]),
  cards: Object.fromEntries([...document.querySelectorAll('#plugin_cards .card b')].map(
    (b) => [b.id, b.textContent])),
  core: Object.fromEntries(['requests', 'cache_hit_rate', 'error_rate', 'state'].map(
    (id) => [id, document.getElementById(id).textContent])),
  tables: Object.fromEntries([...document.querySelectorAll('#plugin_tables tbody')].map(
    (b) => [b.id, [...b.rows].map((r) => [...r.cells].map((c) => c.textContent))])),
  charts: Object.fromEntries([...document.querySelectorAll('#chart_list figure')].map((f) => [
    f.id, {
      window: f.dataset.window, hidden: f.hidden,
      points: [...f.querySelectorAll('circle')].map(
        (c) => [c.dataset.series, Number(c.dataset.t), Number(c.dataset.v)]),
      labels: [...f.querySelectorAll('svg > text')].map((t) => t.textContent),
    }])),
}))()"""

PARSE = {  # format: how the page writes it (cents, or two significant digits under a cent)
    "money": r"\$(-?\d+\.(?:\d\d|0\d{2,5}))",
    "percent": r"(-?\d+\.\d) %",
    "ms": r"(\d+(?:\.\d\d)?) ms",
    "count": r"(\d+)",
}


class Shown(float):
    """A number read from the page's text, with the rounding its decimals imply."""

    rounding: float


def shown(text: str, fmt: str) -> Shown | str | None:
    """A value as read back from the page's text (None for "-")."""
    if text == "-":
        return None
    if fmt == "text":
        return text
    m = re.fullmatch(PARSE[fmt], text)
    assert m, f"{text!r} is not written as {fmt}"
    value = Shown(m.group(1))
    decimals = len(m.group(1).partition(".")[2])
    if fmt == "ms" and not decimals:  # "12 ms" is 12.00 with ".00" left out
        decimals = 2
    value.rounding = 0.5 * 10.0**-decimals if decimals else 0.0
    return value


def close(got: Any, want: Any, fmt: str, what: str) -> None:
    """``got`` (read from the page, or the JSON answer) is ``want`` (SQL), within the rounding
    of the page's format and the latency histogram's precision."""
    if want is None or got is None or fmt == "text":
        assert got == want, f"{what}: {got!r} != {want!r}"
        return
    want = float(want)
    slack = (got.rounding if isinstance(got, Shown) else 0.0) + 1e-9 * (1 + abs(want))
    if fmt == "ms":
        slack += LATENCY_PRECISION * want
    assert abs(float(got) - want) <= slack, f"{what}: {got} != {want} (±{slack})"


def check(
    seen: dict[str, Any], expected: dict[str, Any], *, dom: bool, windows: tuple[str, ...]
) -> None:
    """Every card, table row and chart point against SQL."""
    assert set(seen["cards"]) >= set(CARDS)
    for name, fmt in CARDS.items():
        got = shown(seen["cards"][name], fmt) if dom else seen["cards"][name]
        close(got, expected["cards"][name], fmt, name)
    for name, formats in TABLES.items():
        rows, want = seen["tables"][name], expected["tables"][name]
        assert len(rows) == len(want), f"{name}: {rows} != {want}"
        if name != "top_users":  # the order of equal counts is the database's choice
            counts = [float(shown(r[1], "count") if dom else r[1]) for r in rows]  # type: ignore[arg-type]
            assert counts == sorted(counts, reverse=True), f"{name} not by requests: {rows}"
            rows = sorted(rows, key=lambda r: str(r[0]))
            want = sorted(want, key=lambda r: str("-" if dom and r[0] is None else r[0]))
        for row, sql_row in zip(rows, want, strict=True):
            for i, (cell, fmt) in enumerate(zip(row, formats, strict=True)):
                got = shown(cell, fmt) if dom else cell
                close(got, sql_row[i], fmt, f"{name} {sql_row[0]} column {i}")
    for window in windows:
        for chart in CHARTS:
            name = f"{chart}_{window}"
            got, want = seen["charts"][name], expected["charts"][name]
            assert [p[:2] for p in got] == [p[:2] for p in want], f"{name}: points differ"
            fmt = "ms" if chart == "latency" else "count"
            for g, w in zip(got, want, strict=True):
                close(g[2], w[2], fmt, f"{name} {w[0]} at {w[1]}")


def now_minute_of(seen: dict[str, Any]) -> float:
    """The minute the figures were computed in: the hour chart's last point."""
    times = [t for s, t, _ in seen["charts"]["requests_hour"]["points"] if s == "requests"]
    assert len(times) == 60 and times == sorted(times) and times[-1] % 60 == 0
    return float(times[-1])


def not_blank(png: bytes, boxes: list[dict[str, float]]) -> None:
    """Each chart's box in the screenshot holds a drawing: many colours, some ink, not all."""
    _, height, rows = png_pixels(png)
    for box in boxes:
        assert box["y"] + box["height"] <= height, "the chart is below the screenshot"
        inside = [
            px
            for row in rows[int(box["y"]) : int(box["y"] + box["height"])]
            for px in row[int(box["x"]) : int(box["x"] + box["width"])]
        ]
        assert len(set(inside)) > 10, box
        ink = sum(px != (255, 255, 255) for px in inside) / len(inside)
        assert 0.01 < ink < 0.6, (box, ink)


async def chart_boxes(page: Page, window: str) -> list[dict[str, float]]:
    return [await page.box(f"#{chart}_{window} svg") for chart in CHARTS]


async def open_dashboard(page: Page, url: str) -> dict[str, Any]:
    await page.viewport(1400, 1500, timezone="UTC")
    await page.goto(f"{url}/dashboard#key={ADMIN_KEY}")
    await page.until("!!document.querySelector('#requests_hour circle')")
    return await page.eval(READ)  # type: ignore[no-any-return]


async def test_dashboard_history_in_chromium_matches_sql(
    make_gateway: Callable[..., Any], tmp_path: Path
) -> None:
    started = time.time()
    db, spool = tmp_path / "usage.duckdb", tmp_path / "usage.spool"
    old = old_rows(started)
    leave_in_spool(spool, old)
    gw: Gw = await make_gateway(chain(db, spool))
    assert not list(spool.glob("deadhost-*.jsonl"))  # adopted and loaded at start
    sent = await traffic(gw)
    [[n_old, n_live]] = await sql(
        gw.http,
        gw.url,
        "SELECT count(*) FILTER (WHERE request_id LIKE 'old-%'), "
        "count(*) FILTER (WHERE request_id NOT LIKE 'old-%') FROM usage",
    )
    assert (n_old, n_live) == (len(old), sent)

    async with chromium(tmp_path / "profile") as page:
        seen = await open_dashboard(page, gw.url)
        expected = await truth(gw.http, gw.url, now_minute_of(seen))
        check(flat(seen), expected, dom=True, windows=("hour", "day"))
        # the core's counters: the live requests only (the older rows came from the spool)
        assert seen["core"]["requests"] == str(sent)
        assert seen["core"]["state"].startswith("live · chain: auth, limits, cache, metering")
        assert seen["pressed"] == [["last hour", "true"], ["last day", "false"]]
        hidden = {name: c["hidden"] for name, c in seen["charts"].items()}
        assert hidden == {f"{c}_{w}": w != "hour" for c in CHARTS for w in WINDOWS}
        # the history is there: points before the live traffic, yesterday's if the day allows
        hour_points = seen["charts"]["requests_hour"]["points"]
        assert any(v > 0 and t < started - 600 for _, t, v in hour_points)
        assert expected["cards"]["hour_error_rate"] and expected["cards"]["hour_cache_hit_rate"]
        for name, c in seen["charts"].items():  # axis labels: round numbers, then times
            top, half, zero, *times = c["labels"]
            assert re.fullmatch(r"((1|2|25|5)0*|2\.5|0\.0*(1|2|25|5))( %| ms)?", top), (name, top)
            assert re.fullmatch(r"\d+(\.\d{1,2})?( %| ms)?", half) and zero[0] == "0", name
            assert len(times) >= 4 and all(re.fullmatch(r"\d\d:\d\d", t) for t in times), name

        png = await page.screenshot()
        (tmp_path / "dashboard-history-hour.png").write_bytes(png)
        print(f"screenshot: {tmp_path / 'dashboard-history-hour.png'}")
        not_blank(png, await chart_boxes(page, "hour"))

        # the day window, read in the same turn as the click (no poll in between)
        day = await page.eval(
            "(() => { document.querySelector('#chart_windows [data-window=day]').click();"
            f" return {READ}; }})()"
        )
        assert day["pressed"] == [["last hour", "false"], ["last day", "true"]]
        assert {name: c["hidden"] for name, c in day["charts"].items()} == {
            f"{c}_{w}": w != "day" for c in CHARTS for w in WINDOWS
        }
        if now_minute_of(day) != now_minute_of(seen):  # a poll in a new minute came between
            expected = await truth(gw.http, gw.url, now_minute_of(day))
        check(flat(day), expected, dom=True, windows=("day",))
        day_points = day["charts"]["requests_day"]["points"]
        assert any(v > 0 and t < started - 6 * 3600 for _, t, v in day_points)
        png = await page.screenshot()
        (tmp_path / "dashboard-history-day.png").write_bytes(png)
        print(f"screenshot: {tmp_path / 'dashboard-history-day.png'}")
        not_blank(png, await chart_boxes(page, "day"))


# ---- the meter serves the dashboard --------------------------------------------------------


def from_stats(s: dict[str, Any]) -> dict[str, Any]:
    """``/admin/stats``' figures in the shape the page's reading has (values, not texts)."""
    columns = {t["name"]: [c["key"] for c in t["columns"]] for t in s["tables"]}
    return {
        "cards": {c["name"]: c["value"] for c in s["cards"]},
        "tables": {
            t["name"]: [[r[k] for k in columns[t["name"]]] for r in t["rows"]] for t in s["tables"]
        },
        "charts": {
            c["name"]: {
                "points": [
                    [ser["label"], t, v]
                    for ser in c["series"]
                    for t, v in zip(c["times"], ser["values"], strict=True)
                    if v is not None
                ]
            }
            for c in s["charts"]
        },
    }


def flat(seen: dict[str, Any]) -> dict[str, Any]:
    return {**seen, "charts": {k: c["points"] for k, c in seen["charts"].items()}}


async def test_the_meter_serves_the_dashboard(
    make_gateway: Callable[..., Any], redis_url: str, tmp_path: Path
) -> None:
    base = policy(state={"url": redis_url})
    text = policy_text(base, emu="http://127.0.0.1:1")
    text += chain(tmp_path / "meter.duckdb", tmp_path / "meter.spool", "redis", "50ms")
    async with running_meter(text) as (site, _):
        gw: Gw = await make_gateway(
            chain(tmp_path / "gw.duckdb", tmp_path / "gw.spool", "redis", "50ms"), base=base
        )
        sent = await traffic(gw)

        async def loaded() -> bool:
            return (await sql(gw.http, site, "SELECT count(*) FROM usage")) == [[sent]]

        await until(loaded, 10.0, "the meter loaded every row")
        async with gw.http.get(f"{gw.url}/admin/stats", headers=ADMIN) as r:
            assert (await r.json())["charts"] == []  # the gateway keeps no usage database
        async with gw.http.get(f"{site}/admin/stats", headers=ADMIN) as r:
            assert r.status == 200
            s = await r.json()
        assert s["redis"] == "available" and s["loaded_rows"] == sent  # its stream figures
        assert s["usage"]["business"]["requests"] == sent
        got = from_stats(s)
        expected = await truth(gw.http, site, now_minute_of(got))
        check(flat(got), expected, dom=False, windows=("hour", "day"))
        async with gw.http.get(f"{site}/admin/stats") as r:
            assert r.status == 401  # behind the admin key, as on a gateway

        async with chromium(tmp_path / "profile") as page:
            seen = await open_dashboard(page, site)
            check(
                flat(seen),
                await truth(gw.http, site, now_minute_of(seen)),
                dom=True,
                windows=("hour", "day"),
            )
            assert seen["core"]["state"] == "live"  # no chain, no uptime: the meter's answer
            meter_cards = ("meter_redis", "meter_loaded_rows", "meter_stream_entries")
            assert [seen["cards"][c] for c in meter_cards] == ["available", str(sent), "0"]
            core_hidden = await page.eval(
                "['requests', 'rps', 'in_flight', 'recommendation']"
                ".map((id) => document.getElementById(id).parentElement.hidden)"
            )
            assert core_hidden == [True] * 4
            png = await page.screenshot()
            (tmp_path / "meter-dashboard.png").write_bytes(png)
            print(f"screenshot: {tmp_path / 'meter-dashboard.png'}")
            not_blank(png, await chart_boxes(page, "hour"))
