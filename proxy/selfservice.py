"""Self-service for key holders: ``GET /v1/tollway/usage`` (their own account as JSON) and the
page ``GET /usage`` that shows it.

A customer with a gateway key sees their plan, quota, budget, this month's usage by feature
and by model, cache savings and the bill so far, without an operator. The caller is whoever
the key presented belongs to (``proxy.routeauth.caller``, the client endpoints' own
authentication): the route takes no user parameter at all, so no other user's data is
reachable, and a wrong key is the client endpoints' 401. The core knows no plugin: each
plugin of the live chain tells its own part through the ``account_report`` hook (limits: the
quota; metering: usage, cache, bill; a budget plugin: the budget), and a section no plugin
gives is null. Nothing here runs on the request path.

The page carries no data and no key: the customer types the key into a form, the script keeps
it in a variable only (never the URL, storage or the document) and sends it in the
``Authorization`` header. Both answers are ``Cache-Control: no-store``; the page's CSP lets it
run only its own inline script and talk only to its own origin.
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from proxy.appkeys import GATEWAY
from proxy.errors import Reject, reject_body
from proxy.handler import request_dialect
from proxy.routeauth import caller

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from proxy.context import Principal

log = logging.getLogger("tollway")

USAGE_PATH = "/v1/tollway/usage"
PAGE_PATH = "/usage"

SECTIONS = ("quota", "budget", "usage", "cache", "bill")
"""Sections always present in the answer (null when no plugin of the chain gives them)."""

_JSON_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}

_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; connect-src 'self'; form-action 'none'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def _month(now: float) -> str:
    return datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m")


def _key_info(principal: Principal) -> dict[str, Any]:
    """What the caller's own key record says about itself (no secret: the key is hashed)."""
    attrs = principal.attrs
    return {
        "id": principal.key_id,
        **{k: attrs[k] for k in ("name", "expires_at", "scopes", "labels") if k in attrs},
    }


async def account(request: web.Request, principal: Principal, now: float) -> dict[str, Any]:
    """The caller's account: the core's part, then each plugin's sections in chain order."""
    chain = request.app[GATEWAY].runtime.chain
    month = _month(now)
    body: dict[str, Any] = {
        "object": "tollway.usage",
        "user": principal.user_id,
        "tier": principal.tier,
        "key": _key_info(principal),
        "month": month,
        "as_of": datetime.datetime.fromtimestamp(now, datetime.UTC)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z"),
    }
    notes: list[str] = []
    for hook in chain.account_report:
        try:
            sections = await hook(principal, month)
        except Exception:
            # the caller gets the other plugins' part; the failure is the operator's to read
            log.exception("account report of plugin %s failed", chain.name_of(hook))
            notes.append(f"part of this report is unavailable ({chain.name_of(hook)})")
            continue
        for name, value in (sections or {}).items():
            if name == "notes":
                notes.extend(str(n) for n in value or ())
            elif name not in body:
                body[name] = value
    for name in SECTIONS:
        body.setdefault(name, None)
    body["notes"] = notes
    return body


async def usage(request: web.Request) -> web.Response:
    """``GET /v1/tollway/usage``: the caller's own account, found from its key alone."""
    dialect = request_dialect(request)
    try:
        if not request.app[GATEWAY].runtime.chain.authenticate:
            raise Reject(
                404,
                "this gateway identifies no callers (no auth plugin in its chain), so it has "
                "no accounts to show",
                code="not_found",
            )
        principal = await caller(request, dialect)
    except Reject as e:
        headers = {**_JSON_HEADERS, **e.headers}
        return web.Response(
            status=e.status,
            body=reject_body(e, dialect),
            content_type="application/json",
            headers=headers,
        )
    body = await account(request, principal, time.time())
    return web.Response(
        body=orjson.dumps(body, default=str),
        content_type="application/json",
        headers=_JSON_HEADERS,
    )


async def page(request: web.Request) -> web.Response:
    """``GET /usage``: the static page; it holds no data until the customer types a key."""
    return web.Response(text=PAGE, content_type="text/html", headers=_PAGE_HEADERS)


def add_routes(
    app: web.Application,
    wrap: Callable[[Callable[[web.Request], Awaitable[web.StreamResponse]]], Any],
) -> None:
    """Register the two routes (``wrap``: the app's ``with_request_id``)."""
    app.router.add_get(USAGE_PATH, wrap(usage))
    app.router.add_get(PAGE_PATH, wrap(page))


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Your usage</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<style>
body{font:14px system-ui,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
header{background:#1d2330;color:#fff;padding:12px 20px} header h1{font-size:18px;margin:0}
form,#error,#account{padding:16px 20px} #error{color:#b3261e}
.cards{display:grid;gap:12px;grid-template-columns:repeat(auto-fill,minmax(190px,1fr))}
.card{background:#fff;border-radius:8px;padding:12px 14px;box-shadow:0 1px 2px #0002}
.card b{display:block;font-size:22px;margin-top:4px} .card span{color:#5b6375}
table{border-collapse:collapse;background:#fff;width:100%;margin-bottom:12px}
td,th{padding:6px 10px;border-bottom:1px solid #e4e6eb;text-align:left}
td.n,th.n{text-align:right}
</style></head><body>
<header><h1>Your usage</h1></header>
<form id="login" autocomplete="off"><label>API key
<input id="key" type="password" autocomplete="off" spellcheck="false"></label>
<button id="show" type="submit">Show</button></form>
<div id="error" role="alert" hidden></div>
<div id="account" hidden>
<p>User <b id="user"></b>, plan <b id="tier"></b>, month <b id="month"></b>
(as of <span id="as_of"></span>)</p>
<div class="cards">
<div class="card"><span>requests this month</span><b id="quota_used">-</b>
<span>of <span id="quota_limit">-</span>, <span id="quota_left">-</span> left;
resets <span id="quota_resets_at">-</span></span></div>
<div class="card"><span>budget</span><b id="budget_left">-</b>
<span>spent <span id="budget_spent">-</span> of <span id="budget_limit">-</span></span></div>
<div class="card"><span>usage charges</span><b id="usage_price">-</b>
<span><span id="usage_requests">-</span> requests, <span id="usage_tokens">-</span> tokens</span></div>
<div class="card"><span>answered from cache</span><b id="cache_hits">-</b>
<span>saved <span id="cache_saved">-</span> of provider cost</span></div>
<div class="card"><span>bill so far</span><b id="bill_total">-</b></div>
</div>
<h3>By feature</h3><table><thead><tr><th>feature</th><th class="n">requests</th>
<th class="n">tokens in</th><th class="n">tokens out</th><th class="n">charges</th></tr></thead>
<tbody id="by_feature"></tbody></table>
<h3>By model</h3><table><thead><tr><th>model</th><th class="n">requests</th>
<th class="n">tokens in</th><th class="n">tokens out</th><th class="n">charges</th></tr></thead>
<tbody id="by_model"></tbody></table>
<h3>Bill so far</h3><table><thead><tr><th>line</th><th class="n">quantity</th>
<th class="n">unit price</th><th class="n">total</th></tr></thead>
<tbody id="bill_lines"></tbody></table>
<ul id="notes"></ul>
</div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const show = (v) => (v === null || v === undefined ? "-" : String(v));
// exact decimal text as sent; a number (a budget's) to the cent
const money = (v) => (v === null || v === undefined ? "-"
  : "$" + (typeof v === "number" ? v.toFixed(2) : String(v)));
let key = "";  // in this variable only: never the URL, storage or the document
function text(id, v) { $(id).textContent = v; }
function rows(id, items, cells) {
  const body = $(id);
  body.replaceChildren();
  for (const item of items || []) {
    const tr = document.createElement("tr");
    cells(item).forEach((c, i) => {
      const td = document.createElement("td");
      td.textContent = c;
      if (i > 0) td.className = "n";
      tr.appendChild(td);
    });
    body.appendChild(tr);
  }
}
const blank = $("account").cloneNode(true);  // the page before any account was shown
function fail(message) {
  $("account").replaceWith(blank.cloneNode(true));  // nothing of an earlier answer stays
  text("error", message);
  $("error").hidden = false;
}
function render(a) {
  text("user", a.user); text("tier", show(a.tier)); text("month", a.month); text("as_of", a.as_of);
  const q = a.quota || {};
  text("quota_used", show(q.used));
  text("quota_limit", a.quota ? (q.limit === null ? "unlimited" : show(q.limit)) : "-");
  text("quota_left", a.quota && q.limit === null ? "unlimited" : show(q.left));
  text("quota_resets_at", show(q.resets_at));
  const b = a.budget || {};  // the budgets plugin's: {budget: {usd, ...} | null, spent_usd, left_usd}
  const limit = b.budget ? b.budget.usd : null;
  text("budget_left", limit === null ? "no budget" : money(b.left_usd));
  text("budget_spent", money(b.spent_usd)); text("budget_limit", money(limit));
  const u = a.usage || {};
  text("usage_price", money(u.price_usd)); text("usage_requests", show(u.requests));
  text("usage_tokens", a.usage ? String(u.input_tokens + u.output_tokens) : "-");
  const c = a.cache || {};
  text("cache_hits", show(c.hits)); text("cache_saved", money(c.saved_usd));
  text("bill_total", a.bill ? money(a.bill.total) : "-");
  const tok = (r) => [show(r.requests), show(r.input_tokens), show(r.output_tokens), money(r.price_usd)];
  rows("by_feature", u.by_feature, (r) => [r.feature, ...tok(r)]);
  rows("by_model", u.by_model, (r) => [r.model, ...tok(r)]);
  rows("bill_lines", a.bill && a.bill.lines,
       (l) => [l.description, show(l.quantity), money(l.unit_price), money(l.total)]);
  const notes = $("notes");
  notes.replaceChildren();
  for (const n of a.notes || []) {
    const li = document.createElement("li"); li.textContent = n; notes.appendChild(li);
  }
  $("error").hidden = true;
  $("account").hidden = false;
}
async function load() {
  let r;
  try {
    r = await fetch("/v1/tollway/usage", {
      headers: {"Authorization": "Bearer " + key}, cache: "no-store", credentials: "omit",
    });
  } catch (e) { fail("The gateway could not be reached."); return; }
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (!r.ok) {
    const msg = body && body.error && body.error.message;
    fail(r.status === 401 ? "This key is not valid." : "Error " + r.status + (msg ? ": " + msg : ""));
    return;
  }
  render(body);
}
$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  key = $("key").value.trim();
  $("key").value = "";  // the typed key leaves the form at once
  if (key) load(); else fail("Type your API key.");
});
</script></body></html>
"""
