"""The live dashboard (``GET /dashboard``) and what it shows (``GET /admin/stats``).

The page is static HTML with a little script and carries no data: it asks for the admin key
(or takes it from the URL fragment, ``/dashboard#key=...``, which browsers never send to the
server), keeps it in the tab's session storage and polls ``/admin/stats`` with it every five
seconds. So the business figures stay behind the admin key like the rest of the admin API, and
the page costs the request path nothing: stats are computed from the counters the gateway keeps
anyway, and the plugins' figures (``dashboard_figures``: metering's usage views, the limits
plugin's admission queue...) are asked for only when someone is looking. The page knows no
plugin: it renders the cards, tables and history charts it receives by their format
(``proxy.figures``); the charts are drawn by the page's own script as inline SVG (no chart
library, nothing fetched but ``/admin/stats``), one time window ("hour", "day") at a time.
It also renders whatever core fields are present, so a process serving only plugin figures
can serve the same page.

``/admin/stats`` also carries the autoscaling signals an orchestrator can poll: CPU (the
gateway process, since the last poll), memory, requests in flight and waiting for a slot, and a
recommendation from the product plan's thresholds (scale up above 70 % CPU, 80 % of the memory
budget or 50 queued; down below 30 % CPU and 5 queued).
"""

from __future__ import annotations

import logging
import os
import re
import resource
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from proxy.appkeys import GATEWAY, METRICS
from proxy.figures import Chart, Figures

if TYPE_CHECKING:
    from proxy.chain import Chain

log = logging.getLogger("tollway")

SCALE_UP = {"cpu": 70.0, "memory": 80.0, "queue": 50}
SCALE_DOWN = {"cpu": 30.0, "queue": 5}
MEMORY_BUDGET_MB = 512.0
"""The memory figure's 100 % (a container limit would be the better reference; unknown here)."""

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class CpuMeter:
    """The process's CPU use between two calls, in percent of one core."""

    def __init__(self) -> None:
        self.last = (time.monotonic(), time.process_time())

    def percent(self) -> float:
        now = (time.monotonic(), time.process_time())
        wall, cpu = now[0] - self.last[0], now[1] - self.last[1]
        self.last = now
        return 100.0 * cpu / wall if wall > 0 else 0.0


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE / 2**20
    except OSError:  # not Linux: the peak is the best the standard library offers
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scaling(cpu: float, memory_mb: float, in_flight: int, queued: int) -> dict[str, Any]:
    memory = 100.0 * memory_mb / MEMORY_BUDGET_MB
    if cpu > SCALE_UP["cpu"] or memory > SCALE_UP["memory"] or queued > SCALE_UP["queue"]:
        advice = "scale_up"
    elif cpu < SCALE_DOWN["cpu"] and queued < SCALE_DOWN["queue"]:
        advice = "scale_down"
    else:
        advice = "steady"
    return {
        "cpu_percent": round(cpu, 1),
        "memory_mb": round(memory_mb, 1),
        "memory_percent": round(memory, 1),
        "in_flight": in_flight,
        "queued": queued,
        "recommendation": advice,
    }


def _plain(value: Any) -> Any:
    """A metric value as JSON: labelled values become {"a,b": v}."""
    if isinstance(value, dict):
        return {",".join(map(str, k)): v for k, v in value.items()}
    return value


async def _figures(chain: Chain) -> list[Figures]:
    """Each plugin's figures (``dashboard_figures``), in chain order; one that fails is left
    out and logged, so a broken plugin never costs the page the others' figures."""
    out: list[Figures] = []
    for hook in chain.dashboard_figures:
        try:
            figures = await hook()
        except Exception:
            log.exception("dashboard figures of plugin %s failed", chain.name_of(hook))
            continue
        if figures is not None:
            out.append(figures)
    return out


def _drawable(chart: Chart) -> bool:
    """Whether every series has one value per time: a chart that does not is dropped (and
    logged) rather than drawn wrong, so a broken plugin costs the page that chart only."""
    n = len(chart.times)
    bad = [s.label for s in chart.series if len(s.values) != n]
    if bad:
        log.warning(
            "dashboard chart %r dropped: series %s do not have one value per time (%d)",
            chart.name,
            ", ".join(map(repr, bad)),
            n,
        )
    return not bad


def add_figures(body: dict[str, Any], figures: list[Figures]) -> None:
    """The plugins' cards, tables, charts and sections into the answer; a name already taken
    (by the core or an earlier plugin) is dropped, since it is an element id on the page."""
    taken = set(PAGE_IDS)
    cards: list[dict[str, Any]] = []
    tables: list[dict[str, Any]] = []
    charts: list[dict[str, Any]] = []
    body["cards"] = cards
    body["tables"] = tables
    body["charts"] = charts
    for f in figures:
        for card in f.cards:
            if card.name not in taken:
                taken.add(card.name)
                cards.append(asdict(card))
        for table in f.tables:
            if table.name not in taken:
                taken.add(table.name)
                tables.append(asdict(table))
        for chart in f.charts:
            if chart.name not in taken and _drawable(chart):
                taken.add(chart.name)
                charts.append(asdict(chart))
        for name, section in f.sections.items():
            if name not in body:
                body[name] = section


async def stats(request: web.Request) -> web.Response:
    """Everything the dashboard shows, as JSON (behind the admin key: see ``admin``)."""
    app = request.app
    gw = app[GATEWAY]
    metrics = app[METRICS]
    by_status: dict[str, int] = {}
    by_endpoint: dict[str, int] = {}
    cache: dict[str, int] = {}
    for (endpoint, status, cache_status), n in metrics.requests.items():
        klass = f"{status // 100}xx"
        by_status[klass] = by_status.get(klass, 0) + n
        by_endpoint[endpoint] = by_endpoint.get(endpoint, 0) + n
        if cache_status:
            cache[cache_status] = cache.get(cache_status, 0) + n
    total = sum(by_endpoint.values())
    plugins = {name: _plain(v) for name, v in metrics.snapshot().items()}
    figures = await _figures(gw.runtime.chain)
    queued = sum(f.queued for f in figures)
    looked_up = cache.get("hit", 0) + cache.get("miss", 0)
    body = {
        "time": time.time(),
        "uptime_s": round(time.monotonic() - gw.started, 1),
        "chain": list(gw.runtime.chain.names),
        "requests": total,
        "in_flight": metrics.in_flight,
        "by_status": by_status,
        "by_endpoint": by_endpoint,
        "cache": cache,
        "cache_hit_rate": round(100.0 * cache.get("hit", 0) / looked_up, 1) if looked_up else None,
        "error_rate": round(100.0 * by_status.get("5xx", 0) / total, 2) if total else None,
        "avg_latency_ms": (
            round(1000.0 * sum(metrics.latency_sum.values()) / total, 2) if total else None
        ),
        "plugins": plugins,
        "scaling": scaling(gw.cpu.percent(), rss_mb(), metrics.in_flight, queued),
    }
    add_figures(body, figures)
    return web.Response(body=orjson.dumps(body, default=str), content_type="application/json")


async def page(request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html", headers=_PAGE_HEADERS)


_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    # the page runs only its own script and talks only to its own origin
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; connect-src 'self'",
    "Referrer-Policy": "no-referrer",
}

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Tollway dashboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px system-ui,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
header{background:#1d2330;color:#fff;padding:12px 20px;display:flex;gap:16px;align-items:center}
header h1{font-size:18px;margin:0} #state{opacity:.8}
main{padding:16px 20px;display:grid;gap:12px;grid-template-columns:repeat(auto-fill,minmax(190px,1fr))}
.card{background:#fff;border-radius:8px;padding:12px 14px;box-shadow:0 1px 2px #0002}
.card b{display:block;font-size:24px;margin-top:4px} .card span{color:#5b6375}
section{padding:0 20px 20px} table{border-collapse:collapse;background:#fff;width:100%}
td,th{padding:6px 10px;border-bottom:1px solid #e4e6eb;text-align:left}
#login{padding:20px} .up{color:#b3261e} .down{color:#1e7b34}
#charts_box{padding:0 20px 16px} #chart_windows{display:flex;gap:6px;margin-bottom:10px}
#chart_windows button{font:inherit;border:1px solid #c9cdd6;background:#fff;color:#1d2330;
border-radius:6px;padding:4px 12px;cursor:pointer}
#chart_windows button[aria-pressed=true]{background:#1d2330;border-color:#1d2330;color:#fff}
#chart_list{display:grid;gap:12px;grid-template-columns:repeat(auto-fill,minmax(420px,1fr))}
.chart{margin:0;background:#fff;border-radius:8px;padding:10px 14px;box-shadow:0 1px 2px #0002}
.chart h3{margin:0 0 4px;font-size:14px} .chart svg{display:block;width:100%;height:auto}
.legend{display:flex;gap:14px;color:#5b6375;font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px}
.chart text{font-size:11px;fill:#5b6375} .chart line{stroke:#e4e6eb}
</style></head><body>
<header><h1>Tollway</h1><span id="state">connecting…</span></header>
<form id="login" hidden><label>Admin key <input id="key" type="password" autocomplete="off">
</label> <button>Show</button></form>
<main id="cards">
<div class="card"><span>requests since start</span><b id="requests">-</b></div>
<div class="card"><span>requests / s</span><b id="rps">-</b></div>
<div class="card"><span>in flight</span><b id="in_flight">-</b></div>
<div class="card"><span>cache hit rate</span><b id="cache_hit_rate">-</b></div>
<div class="card"><span>error rate (5xx)</span><b id="error_rate">-</b></div>
<div class="card"><span>avg latency</span><b id="avg_latency_ms">-</b></div>
<div id="plugin_cards" style="display:contents"></div>
<div class="card"><span>scaling</span><b id="recommendation">-</b>
<span id="scaling_detail"></span></div>
</main>
<section id="charts_box" hidden><div id="chart_windows"></div><div id="chart_list"></div>
</section>
<div id="plugin_tables"></div>
<section id="by_status_box"><h3>Requests by status</h3><table><tbody id="by_status"></tbody></table></section>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const fmt = (v, unit = "", digits = 2) =>
  v === null || v === undefined ? "-" : (typeof v === "number" ? v.toFixed(digits).replace(/\\.00$/, "") : v) + unit;
// dollars and cents; an amount under a cent with two significant digits (up to six
// decimals), so a small provider cost does not read as $0.00
function money(v) {
  if (v === null || v === undefined) return "-";
  const n = Number(v), size = Math.abs(n);
  const digits = size > 0 && size < 0.01 ? Math.min(6, 1 - Math.floor(Math.log10(size))) : 2;
  return "$" + n.toFixed(digits);
}
let key = sessionStorage.getItem("tollway-admin-key") || "";
const m = location.hash.match(/key=([^&]+)/);
if (m) { key = decodeURIComponent(m[1]); sessionStorage.setItem("tollway-admin-key", key);
         history.replaceState(null, "", location.pathname); }
let last = null;
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function row(cells, tag = "td") {
  const tr = document.createElement("tr");
  for (const c of cells) tr.append(el(tag, c));
  return tr;
}
// a plugin's value, written by the format it names (proxy/figures.py)
function show(v, format) {
  if (v === null || v === undefined) return "-";
  if (format === "money") return money(v);
  if (format === "percent") return fmt(Number(v), " %", 1);
  if (format === "ms") return fmt(Number(v), " ms");
  if (format === "count" && typeof v === "number" && !Number.isInteger(v)) return short(v);
  return String(v);
}
function card(c) {
  const d = el("div", undefined, "card");
  const b = el("b", show(c.value, c.format));
  b.id = c.name;
  d.append(el("span", c.label), b);
  return d;
}
function table(t) {
  const body = el("tbody");
  body.id = t.name;
  body.replaceChildren(...t.rows.map((r) => row(t.columns.map((c) => show(r[c.key], c.format)))));
  const head = el("thead");
  head.append(row(t.columns.map((c) => c.heading), "th"));
  const tab = el("table");
  tab.append(head, body);
  const s = el("section");
  s.append(el("h3", t.title), tab);
  return s;
}
// a number for an axis or a tooltip: at most two decimals, or two significant digits below 1
const short = (v) => String(Number(Math.abs(v) >= 1 || v === 0 ? v.toFixed(2) : v.toPrecision(2)));
// an axis label by the chart's format, short: "200", "$1.5", "50 %", "250 ms"
function tick(v, format) {
  if (format === "money") return "$" + short(v);
  return short(v) + (format === "percent" ? " %" : format === "ms" ? " ms" : "");
}
// the y axis' top: the maximum rounded up to 1, 2, 2.5 or 5 times a power of ten, so the
// labels are round numbers however the values fall (a day's averages: 2.8666... -> 5)
function niceTop(v) {
  if (!(v > 0)) return 1;
  const e = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 2.5, 5, 10].map((m) => m * e).find((t) => t >= v * (1 - 1e-9));
}
// the time axis' inner ticks: whole multiples of a round interval (10 min, 3 h...), at most
// six, none crowding the first and last labels
const TICKS = [60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 14400, 21600, 43200, 86400];
function timeTicks(t0, t1) {
  const span = t1 - t0, every = TICKS.find((s) => span / s <= 6) || 86400, out = [];
  for (let t = Math.ceil(t0 / every) * every; t < t1; t += every)
    if (t - t0 > span * 0.15 && t1 - t > span * 0.15) out.push(t);
  return out;
}
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2f6fde", "#e07b16", "#1e9e6a", "#c2338a", "#7a5af5", "#8a6d3b"];
const two = (n) => String(n).padStart(2, "0");
const hhmm = (t) => { const d = new Date(t * 1000); return two(d.getHours()) + ":" + two(d.getMinutes()); };
let shownWindow = sessionStorage.getItem("tollway-window") || "";
function svg(tag, attrs, parent) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.append(e);
  return e;
}
// one chart as inline SVG: a line per series, broken where a value is null, and a dot per
// value carrying it as received (data-t, data-v, data-series), so what is drawn can be read
function chart(c) {
  const W = 560, H = 180, L = 76, R = 12, T = 10, B = 24, n = c.times.length;
  const all = c.series.flatMap((s) => s.values).filter((v) => v !== null);
  const least = Math.min(0, ...all), top = niceTop(Math.max(0, ...all));
  const low = least < 0 ? -niceTop(-least) : 0;
  const t0 = c.times[0], t1 = c.times[n - 1];
  const x = (t) => L + (t1 > t0 ? (t - t0) / (t1 - t0) : 0.5) * (W - L - R);
  const y = (v) => T + ((top - v) / (top - low)) * (H - T - B);
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": c.title });
  for (const v of low < 0 ? [top, 0, low] : [top, top / 2, 0]) {
    svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v) }, s);
    svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, s).textContent = tick(v, c.format);
  }
  if (n) for (const [t, a] of [[t0, "start"], ...timeTicks(t0, t1).map((t) => [t, "middle"]), [t1, "end"]])
    svg("text", { x: x(t), y: H - 6, "text-anchor": a }, s).textContent = hhmm(t);
  const legend = el("div", undefined, "legend");
  c.series.forEach((ser, i) => {
    const color = COLORS[i % COLORS.length], dots = svg("g", { fill: color });
    let d = "", pen = "M";
    ser.values.forEach((v, j) => {
      if (v === null) { pen = "M"; return; }
      const px = x(c.times[j]).toFixed(1), py = y(v).toFixed(1), t = c.times[j];
      d += `${pen}${px} ${py} `; pen = "L";
      const dot = svg("circle", { cx: px, cy: py, r: n > 120 ? 1.5 : 2.5, "data-t": t, "data-v": v, "data-series": ser.label }, dots);
      svg("title", {}, dot).textContent = `${hhmm(t)} ${ser.label}: ${show(v, c.format)}`;
    });
    svg("path", { d, fill: "none", stroke: color, "stroke-width": 2, "stroke-linejoin": "round" }, s);
    s.append(dots);
    const key = el("span", ser.label), swatch = el("i");
    swatch.style.background = color;
    key.prepend(swatch);
    legend.append(key);
  });
  const f = el("figure", undefined, "chart");
  f.id = c.name;
  f.dataset.window = c.window;
  f.append(el("h3", c.title), legend, s);
  return f;
}
// the charts of one window show at a time ("last hour", "last day"), the choice kept per tab
function showWindow() {
  for (const b of $("chart_windows").children) b.setAttribute("aria-pressed", b.dataset.window === shownWindow);
  for (const f of $("chart_list").children) f.hidden = f.dataset.window !== shownWindow;
}
function charts(list) {
  const windows = [...new Set(list.map((c) => c.window))];
  if (!windows.includes(shownWindow)) shownWindow = windows[0] || "";
  if ($("chart_windows").dataset.list !== windows.join("\\n")) {
    $("chart_windows").dataset.list = windows.join("\\n");
    $("chart_windows").replaceChildren(...windows.map((w) => {
      const b = el("button", "last " + w);
      b.type = "button"; b.dataset.window = w;
      return b;
    }));
  }
  $("charts_box").hidden = !list.length;
  $("chart_list").replaceChildren(...list.map(chart));
  showWindow();
}
$("chart_windows").addEventListener("click", (e) => {
  const w = e.target.dataset && e.target.dataset.window;
  if (w === undefined) return;
  shownWindow = w; sessionStorage.setItem("tollway-window", w); showWindow();
});
// what the answer has: a process serving only plugin figures sends none of the core's fields
function render(s) {
  const has = { rps: "requests", recommendation: "scaling" };
  for (const id of ["requests", "rps", "in_flight", "cache_hit_rate", "error_rate", "avg_latency_ms", "recommendation"])
    $(id).parentElement.hidden = s[has[id] || id] === undefined;
  $("requests").textContent = fmt(s.requests, "", 0);
  if (last && s.requests !== undefined) {
    const dt = s.time - last.time;
    $("rps").textContent = dt > 0 ? fmt((s.requests - last.requests) / dt, "", 1) : "-";
  }
  last = s;
  $("in_flight").textContent = fmt(s.in_flight, "", 0);
  $("cache_hit_rate").textContent = fmt(s.cache_hit_rate, " %", 1);
  $("error_rate").textContent = fmt(s.error_rate, " %");
  $("avg_latency_ms").textContent = fmt(s.avg_latency_ms, " ms");
  $("plugin_cards").replaceChildren(...(s.cards || []).map(card));
  const sc = s.scaling;
  if (sc) {
    $("recommendation").textContent = sc.recommendation.replace("_", " ");
    $("recommendation").className = sc.recommendation === "scale_up" ? "up" : sc.recommendation === "scale_down" ? "down" : "";
    $("scaling_detail").textContent = `CPU ${fmt(sc.cpu_percent, " %", 0)}, ${fmt(sc.memory_mb, " MB", 0)}, ${sc.queued} queued`;
  }
  charts(s.charts || []);
  $("plugin_tables").replaceChildren(...(s.tables || []).map(table));
  $("by_status_box").hidden = !Object.keys(s.by_status || {}).length;
  $("by_status").replaceChildren(...Object.entries(s.by_status || {}).sort().map(([k, v]) => row([k, v])));
  $("state").textContent = "live" + (s.chain ? ` · chain: ${s.chain.join(", ")}` : "") +
    (s.uptime_s !== undefined ? ` · up ${Math.round(s.uptime_s)} s` : "");
}
async function poll() {
  if (!key) { $("login").hidden = false; $("state").textContent = "admin key needed"; return; }
  try {
    const r = await fetch("/admin/stats", { headers: { Authorization: "Bearer " + key } });
    if (r.status === 401 || r.status === 403) {
      sessionStorage.removeItem("tollway-admin-key"); key = "";
      $("login").hidden = false; $("state").textContent = "admin key refused"; return;
    }
    render(await r.json());
  } catch (e) { $("state").textContent = "gateway unreachable, retrying"; }
  setTimeout(poll, 5000);
}
$("login").addEventListener("submit", (e) => {
  e.preventDefault(); key = $("key").value.trim();
  sessionStorage.setItem("tollway-admin-key", key); $("login").hidden = true; poll();
});
poll();
</script></body></html>
"""

PAGE_IDS = frozenset(re.findall(r'id="([^"]+)"', PAGE))
"""The page's own element ids: a plugin's card or table may not take one."""
