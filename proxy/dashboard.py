"""The live dashboard (``GET /dashboard``) and what it shows (``GET /admin/stats``).

The page is static HTML with a little script and carries no data: it asks for the admin key
(or takes it from the URL fragment, ``/dashboard#key=...``, which browsers never send to the
server), keeps it in the tab's session storage and polls ``/admin/stats`` with it every two
seconds. So the business figures stay behind the admin key like the rest of the admin API, and
the page costs the request path nothing: stats are computed from the counters the gateway keeps
anyway, and the plugins' figures (``dashboard_figures``: metering's usage views, the limits
plugin's admission queue...) are asked for only when someone is looking. The page knows no
plugin: it renders the cards and tables it receives by their format (``proxy.figures``).

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
from proxy.figures import Figures

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


def _add_figures(body: dict[str, Any], figures: list[Figures]) -> None:
    """The plugins' cards, tables and sections into the answer; a name already taken (by the
    core or an earlier plugin) is dropped, since it is an element id on the page."""
    taken = set(PAGE_IDS)
    cards: list[dict[str, Any]] = []
    tables: list[dict[str, Any]] = []
    body["cards"] = cards
    body["tables"] = tables
    for f in figures:
        for card in f.cards:
            if card.name not in taken:
                taken.add(card.name)
                cards.append(asdict(card))
        for table in f.tables:
            if table.name not in taken:
                taken.add(table.name)
                tables.append(asdict(table))
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
    _add_figures(body, figures)
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
<div id="plugin_tables"></div>
<section><h3>Requests by status</h3><table><tbody id="by_status"></tbody></table></section>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const fmt = (v, unit = "", digits = 2) =>
  v === null || v === undefined ? "-" : (typeof v === "number" ? v.toFixed(digits).replace(/\\.00$/, "") : v) + unit;
const money = (v) => (v === null || v === undefined ? "-" : "$" + Number(v).toFixed(2));
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
function render(s) {
  $("requests").textContent = s.requests;
  if (last) {
    const dt = s.time - last.time;
    $("rps").textContent = dt > 0 ? fmt((s.requests - last.requests) / dt, "", 1) : "-";
  }
  last = s;
  $("in_flight").textContent = s.in_flight;
  $("cache_hit_rate").textContent = fmt(s.cache_hit_rate, " %", 1);
  $("error_rate").textContent = fmt(s.error_rate, " %");
  $("avg_latency_ms").textContent = fmt(s.avg_latency_ms, " ms");
  $("plugin_cards").replaceChildren(...(s.cards || []).map(card));
  const sc = s.scaling;
  $("recommendation").textContent = sc.recommendation.replace("_", " ");
  $("recommendation").className = sc.recommendation === "scale_up" ? "up" : sc.recommendation === "scale_down" ? "down" : "";
  $("scaling_detail").textContent = `CPU ${fmt(sc.cpu_percent, " %", 0)}, ${fmt(sc.memory_mb, " MB", 0)}, ${sc.queued} queued`;
  $("plugin_tables").replaceChildren(...(s.tables || []).map(table));
  $("by_status").replaceChildren(...Object.entries(s.by_status).sort().map(([k, v]) => row([k, v])));
  $("state").textContent = `live · chain: ${s.chain.join(", ")} · up ${Math.round(s.uptime_s)} s`;
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
  setTimeout(poll, 2000);
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
