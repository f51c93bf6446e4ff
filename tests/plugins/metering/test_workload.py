"""metering under a scripted workload: every request's row, cost, price, the views and invoices.

The workload runs through the official SDKs against a gateway with auth + limits + metering.
The test derives every expected row itself, from the SDK replies (usage) and the policy's
prices, and checks the rows, views and invoices the gateway reports against it, exactly
(Decimal, never floats, for money).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest

from tests.conftest import ADMIN_KEY, Gw
from tests.procs import until

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CENT = Decimal("0.01")
MTOK = Decimal(1_000_000)

# The policy, and the same prices as Decimals for the expectations.
BASE = """
version: 1
admin: {{key: {admin}}}
state: {{dir: null}}
providers:
  openai: {{kind: openai, base_url: "{emu}/v1", api_key: upstream-secret,
           retries: {{attempts: 0}}, timeout: {{connect: 2s, read: 5s}}}}
  anthropic: {{kind: anthropic, base_url: "{emu}", api_key: upstream-secret,
              retries: {{attempts: 0}}, timeout: {{connect: 2s, read: 5s}}}}
models:
  gpt-5.4-mini: {{provider: openai, input_per_mtok: 0.25, output_per_mtok: 2.0}}
  claude-sonnet: {{provider: anthropic, upstream_model: claude-sonnet-5, input_per_mtok: 3,
                  output_per_mtok: 15}}
  text-embedding-3-small: {{provider: openai, input_per_mtok: 0.02}}
  local-llama: {{provider: openai}}
features:
  basic_suggestions: {{price_per_request: 0.01}}
  code_suggestions: {{price_per_request: 0.02}}
  document_analysis: {{price_per_request: 0.05}}
tiers:
  free: {{requests_per_month: 1000, requests_per_minute: 4, features: [basic_suggestions]}}
  trial: {{requests_per_month: 2, monthly_cost: 5, features: [basic_suggestions]}}
  pro: {{includes: free, requests_per_month: 25000, requests_per_minute: 100, monthly_cost: 29,
         features: [code_suggestions, document_analysis], prices: {{code_suggestions: 0.015}}}}
"""
MODEL_PRICES: dict[str, tuple[str | None, str | None]] = {
    "gpt-5.4-mini": ("0.25", "2.0"),
    "claude-sonnet": ("3", "15"),
    "text-embedding-3-small": ("0.02", None),
    "local-llama": (None, None),
}
FEATURE_PRICES = {
    "basic_suggestions": "0.01",
    "code_suggestions": "0.02",
    "document_analysis": "0.05",
}
PLAN_PRICES = {"pro": {"code_suggestions": "0.015"}}
MONTHLY = {"free": Decimal(0), "trial": Decimal(5), "pro": Decimal(29)}
DEFAULT_FEATURE = "basic_suggestions"


def chain(db: Path) -> str:
    return (
        "chain:\n  - name: auth\n  - name: limits\n    config: {}\n"
        f"  - name: metering\n    config: {{database: {db}, flush_interval: 50ms}}\n"
    )


def cost_of(model: str | None, inp: int, out: int) -> Decimal | None:
    """The billing rule: tokens x per-million prices; None (NULL) without a price."""
    if model is None:  # no model was read (refused before the body)
        return None
    pin, pout = MODEL_PRICES[model]
    if pin is None or (out and pout is None):
        return None
    return (inp * Decimal(pin) + out * Decimal(pout or 0)) / MTOK


def price_of(tier: str | None, feature: str, status: int) -> Decimal:
    if status >= 400:
        return Decimal(0)
    override = PLAN_PRICES.get(tier or "", {})
    return Decimal(override.get(feature, FEATURE_PRICES.get(feature, "0")))


def words(text: str) -> int:
    """The emulator's token rule."""
    return max(1, len(text.split()))


@dataclass
class Expect:
    rid: str
    user: str | None
    tier: str | None
    feature: str
    endpoint: str
    model: str | None
    stream: bool
    status: int
    error_code: str | None
    inp: int = 0
    out: int = 0

    @property
    def cost(self) -> Decimal | None:
        return cost_of(self.model, self.inp, self.out)

    @property
    def price(self) -> Decimal:
        return price_of(self.tier, self.feature, self.status)


async def sql(gw: Gw, query: str) -> list[dict[str, Any]]:
    async with gw.http.post(f"{gw.url}/admin/sql", json={"query": query}, headers=ADMIN) as r:
        res = await r.json()
        assert r.status == 200, res
    return [dict(zip(res["columns"], row, strict=True)) for row in res["rows"]]


def dec(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def close(a: Any, b: float) -> bool:
    return a is not None and abs(float(a) - b) <= 1e-6 * max(1.0, abs(b))


class Workload:
    """Runs requests, recording what each should have produced."""

    def __init__(self, gw: Gw) -> None:
        self.gw = gw
        self.rows: list[Expect] = []

    def add(self, rid: str | None, **kw: Any) -> Expect:
        assert rid, "every reply carries X-Request-Id"
        if kw.get("status") == 401:  # refused on the key alone: the body is never read
            kw.update(model=None, stream=False)
        row = Expect(rid=rid, **kw)
        self.rows.append(row)
        return row

    async def chat(
        self,
        client: openai.AsyncOpenAI,
        user: str,
        tier: str,
        *,
        model: str = "gpt-5.4-mini",
        feature: str | None = None,
        text: str = "please count these words",
        status: int = 200,
        error_code: str | None = None,
        emulator_status: int | None = None,
    ) -> None:
        headers = {"X-Tollway-Feature": feature} if feature else {}
        if emulator_status:
            headers["x-emulator-status"] = str(emulator_status)
        kw = dict(user=user, tier=tier, feature=feature or DEFAULT_FEATURE, endpoint="chat")
        msgs = [{"role": "user", "content": text}]
        if status >= 400:
            with pytest.raises(openai.APIStatusError) as info:
                await client.chat.completions.create(
                    model=model,
                    messages=msgs,  # type: ignore[arg-type]
                    extra_headers=headers,
                )
            err = info.value
            assert err.status_code == status, err
            self.add(
                err.response.headers.get("x-request-id"),
                model=model,
                stream=False,
                status=status,
                error_code=error_code,
                **kw,
            )
            return
        raw = await client.chat.completions.with_raw_response.create(
            model=model,
            messages=msgs,  # type: ignore[arg-type]
            extra_headers=headers,
        )
        reply = raw.parse()
        assert reply.usage is not None
        assert text in (reply.choices[0].message.content or "")
        self.add(
            raw.headers.get("x-request-id"),
            model=model,
            stream=False,
            status=200,
            error_code=None,
            inp=reply.usage.prompt_tokens,
            out=reply.usage.completion_tokens,
            **kw,
        )

    async def chat_stream(
        self,
        client: openai.AsyncOpenAI,
        user: str,
        tier: str,
        *,
        include_usage: bool,
        feature: str | None = None,
    ) -> None:
        text = "stream these words back to me"
        msgs = [{"role": "user", "content": text}]
        extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
        stream = await client.chat.completions.create(
            model="gpt-5.4-mini",
            messages=msgs,  # type: ignore[arg-type]
            stream=True,
            extra_headers={"X-Tollway-Feature": feature} if feature else {},
            **extra,
        )
        content, usage = "", None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                content += chunk.choices[0].delta.content
            if chunk.usage is not None:
                usage = chunk.usage
        assert content == "Echo: " + text
        if include_usage:
            assert usage is not None
            inp, out = usage.prompt_tokens, usage.completion_tokens
        else:
            # no usage chunk for the client: what it got says it all (emulator: words = tokens)
            assert usage is None
            inp, out = words(text), words(content)
        self.add(
            stream.response.headers.get("x-request-id"),
            user=user,
            tier=tier,
            feature=feature or DEFAULT_FEATURE,
            endpoint="chat",
            model="gpt-5.4-mini",
            stream=True,
            status=200,
            error_code=None,
            inp=inp,
            out=out,
        )

    async def messages(
        self,
        client: anthropic.AsyncAnthropic,
        user: str | None,
        tier: str | None,
        *,
        stream: bool = False,
        feature: str | None = None,
        status: int = 200,
        error_code: str | None = None,
    ) -> None:
        headers = {"X-Tollway-Feature": feature} if feature else {}
        msgs = [{"role": "user", "content": "hello claude, how are you"}]
        kw = dict(
            user=user,
            tier=tier,
            feature=feature or DEFAULT_FEATURE,
            endpoint="messages",
            model="claude-sonnet",
            stream=stream,
        )
        if status >= 400:
            with pytest.raises(anthropic.APIStatusError) as info:
                await client.messages.create(
                    model="claude-sonnet",
                    max_tokens=100,
                    messages=msgs,  # type: ignore[arg-type]
                    extra_headers=headers,
                )
            assert info.value.status_code == status
            rid = info.value.response.headers.get("x-request-id")
            self.add(rid, status=status, error_code=error_code, **kw)
            return
        if stream:
            async with client.messages.stream(
                model="claude-sonnet",
                max_tokens=100,
                messages=msgs,  # type: ignore[arg-type]
                extra_headers=headers,
            ) as s:
                text = "".join([t async for t in s.text_stream])
                msg = await s.get_final_message()
                rid = s.response.headers.get("x-request-id")
        else:
            raw = await client.messages.with_raw_response.create(
                model="claude-sonnet",
                max_tokens=100,
                messages=msgs,  # type: ignore[arg-type]
                extra_headers=headers,
            )
            msg = await raw.parse()
            text = msg.content[0].text  # type: ignore[union-attr]
            rid = raw.headers.get("x-request-id")
        assert text.startswith("Echo: hello claude")
        self.add(
            rid,
            status=200,
            error_code=None,
            inp=msg.usage.input_tokens,
            out=msg.usage.output_tokens,
            **kw,
        )

    async def embeddings(self, client: openai.AsyncOpenAI, user: str, tier: str) -> None:
        raw = await client.embeddings.with_raw_response.create(
            model="text-embedding-3-small", input=["first text here", "and a second one"]
        )
        reply = raw.parse()
        assert len(reply.data) == 2
        self.add(
            raw.headers.get("x-request-id"),
            user=user,
            tier=tier,
            feature=DEFAULT_FEATURE,
            endpoint="embeddings",
            model="text-embedding-3-small",
            stream=False,
            status=200,
            error_code=None,
            inp=reply.usage.prompt_tokens,
            out=0,
        )

    async def abandon(self, key: str, user: str, tier: str, *, anthropic_api: bool) -> Expect:
        """Read a few content events of a long, slow stream, then hang up."""
        msgs = [{"role": "user", "content": "write me a very long story please"}]
        body: dict[str, Any] = {"model": "gpt-5.4-mini", "messages": msgs, "stream": True}
        path, feature, marker = "/v1/chat/completions", "document_analysis", b'"delta":{"content":"'
        headers = {
            "Authorization": f"Bearer {key}",
            "X-Tollway-Feature": feature,
            "x-emulator-words": "400",
            "x-emulator-chunk-delay-ms": "30",
        }
        if anthropic_api:
            body = {"model": "claude-sonnet", "messages": msgs, "stream": True, "max_tokens": 1000}
            path, marker = "/v1/messages", b"content_block_delta"
            headers["anthropic-version"] = "2023-06-01"
        seen = 0
        async with self.gw.http.post(self.gw.url + path, json=body, headers=headers) as r:
            assert r.status == 200
            rid = r.headers.get("x-request-id")
            async for line in r.content:
                if line.startswith(b"data:") and marker in line:
                    seen += 1
                    if seen == 4:
                        break
            r.close()  # abandon the stream: the connection goes away mid-reply
        row = self.add(
            rid,
            user=user,
            tier=tier,
            feature=feature,
            endpoint="messages" if anthropic_api else "chat",
            model="claude-sonnet" if anthropic_api else "gpt-5.4-mini",
            stream=True,
            status=200,
            error_code="client_disconnected",
        )
        # what the billing rule says the gateway may estimate; the row's own counts are
        # checked against it once it is written
        row.inp = words(msgs[0]["content"]) if anthropic_api else len(orjson.dumps(msgs)) // 4
        row.out = seen  # at least the content events the client got
        return row


async def wait_for_rows(gw: Gw, rids: list[str], patience: float = 10.0) -> None:
    """Abandoned streams are logged when the gateway notices the hang-up."""
    ids = ", ".join(f"'{r}'" for r in rids)

    async def logged() -> bool:
        got = await sql(
            gw, f"SELECT count(*) AS n FROM usage WHERE request_id IN ({ids}) AND final"
        )
        return bool(got[0]["n"] == len(rids))

    await until(logged, patience, "abandoned streams were never logged")


def money(v: Decimal) -> str:
    return str(v.quantize(CENT, ROUND_HALF_UP))


def expected_invoice(user: str, tier: str, month: str, rows: list[Expect]) -> dict[str, Any]:
    monthly = MONTHLY[tier]
    lines: list[dict[str, Any]] = [
        {
            "description": f"{tier} plan, {month}",
            "service": "subscription",
            "endpoint": None,
            "feature": None,
            "quantity": 1,
            "unit_price": format(monthly.normalize(), "f") if monthly else "0",
            "total": money(monthly),
        }
    ]
    groups: dict[tuple[str, str, Decimal], int] = defaultdict(int)
    for r in rows:
        if r.user == user and r.status < 400:
            groups[(r.endpoint, r.feature, r.price)] += 1
    for (endpoint, feature, unit), qty in sorted(groups.items()):
        lines.append(
            {
                "description": f"AI API: {endpoint} / {feature}",
                "service": "ai_api",
                "endpoint": endpoint,
                "feature": feature,
                "quantity": qty,
                "unit_price": format(unit.normalize(), "f") if unit else "0",
                "total": money(unit * qty),
            }
        )
    total = sum((Decimal(x["total"]) for x in lines), Decimal(0))
    return {"user": user, "tier": tier, "lines": lines, "total": money(total)}


@pytest.fixture
async def metered(make_gateway: Any, tmp_path: Path) -> Gw:
    return await make_gateway(chain(tmp_path / "usage.duckdb"), base=BASE)  # type: ignore[no-any-return]


async def test_workload_rows_views_and_invoices(metered: Gw) -> None:
    gw = metered
    w = Workload(gw)
    keys = {u: await gw.create_key(u, t) for u, t in [("alice", "pro"), ("bob", "free")]}
    keys["carol"] = await gw.create_key("carol", "trial")
    alice, bob, carol = (gw.openai(keys[u]) for u in ("alice", "bob", "carol"))
    alice_a, bob_a = gw.anthropic(keys["alice"]), gw.anthropic(keys["bob"])

    # alice, pro: every kind of request, a plan price override, an unpriced model, an error
    await w.chat(alice, "alice", "pro")
    for _ in range(3):  # 3 x 0.015 = 0.045: the invoice line rounds half up to 0.05
        await w.chat(alice, "alice", "pro", feature="code_suggestions", text="write code now")
    await w.chat_stream(alice, "alice", "pro", include_usage=True, feature="document_analysis")
    await w.messages(alice_a, "alice", "pro")
    await w.messages(alice_a, "alice", "pro", stream=True, feature="document_analysis")
    await w.chat(alice, "alice", "pro", model="claude-sonnet", text="translate me")  # translated
    await w.embeddings(alice, "alice", "pro")
    await w.chat(alice, "alice", "pro", model="local-llama", text="no price for me")
    await w.chat(alice, "alice", "pro", status=500, error_code="upstream_500", emulator_status=500)
    abandoned = [
        await w.abandon(keys["alice"], "alice", "pro", anthropic_api=False),
        await w.abandon(keys["alice"], "alice", "pro", anthropic_api=True),
    ]

    # bob, free (4 requests a minute): a stream without usage, a feature outside his plan, 429s
    await w.chat(bob, "bob", "free")
    await w.chat_stream(bob, "bob", "free", include_usage=False)
    await w.chat(
        bob, "bob", "free", feature="code_suggestions", status=403, error_code="feature_not_in_plan"
    )
    await w.messages(bob_a, "bob", "free")
    await w.chat(bob, "bob", "free", model="local-llama", text="free and unpriced")
    await w.chat(bob, "bob", "free", status=429, error_code="plan_rate_limit_exceeded")
    await w.messages(bob_a, "bob", "free", status=429, error_code="plan_rate_limit_exceeded")

    # carol, trial (2 requests a month): a failed request is given back to the quota
    await w.chat(carol, "carol", "trial")
    await w.chat(
        carol, "carol", "trial", status=500, error_code="upstream_500", emulator_status=500
    )
    await w.chat(carol, "carol", "trial")
    await w.chat(carol, "carol", "trial", status=429, error_code="monthly_quota_exceeded")

    # nobody: bad keys (no user, no plan)
    bad = gw.openai("tw_not_a_key")
    await w.chat(bad, None, None, status=401, error_code="invalid_api_key")  # type: ignore[arg-type]
    await w.messages(gw.anthropic("tw_wrong"), None, None, status=401, error_code="invalid_api_key")

    expected = {r.rid: r for r in w.rows}
    assert len(expected) == len(w.rows) == 26, "request ids are unique"
    await wait_for_rows(gw, [r.rid for r in abandoned])

    # ---- one row per request, each as expected ------------------------------------------------
    rows = await sql(
        gw,
        "SELECT request_id, user_id, tier, feature, endpoint, model, provider, upstream_model, "
        "stream, status, error_code, input_tokens, output_tokens, usage_estimated, cost_usd, "
        "price_usd, final, latency_ms, strftime(ts, '%Y-%m') AS month, CAST(ts AS DATE) AS day "
        "FROM usage",
    )
    got = {r["request_id"]: r for r in rows}
    assert len(got) == len(rows), "duplicate request ids"
    assert set(got) == set(expected), set(got) ^ set(expected)

    for a in abandoned:  # the documented estimate: provider counts if sent, else events/bytes
        row = got[a.rid]
        assert row["usage_estimated"] is True
        assert row["input_tokens"] == a.inp
        assert a.out <= row["output_tokens"] <= a.out + 10, row
        a.out = row["output_tokens"]  # billed on what the gateway counted as delivered
    for rid, e in expected.items():
        row = got[rid]
        want = {
            "user_id": e.user,
            "tier": e.tier,
            "feature": e.feature,
            "endpoint": e.endpoint,
            "model": e.model,
            "stream": e.stream,
            "status": e.status,
            "error_code": e.error_code,
            "input_tokens": e.inp,
            "output_tokens": e.out,
            "usage_estimated": e.error_code == "client_disconnected",
            "final": True,
        }
        assert {k: row[k] for k in want} == want, rid
        assert dec(row["cost_usd"]) == e.cost, (rid, row["cost_usd"], e.cost)
        assert dec(row["price_usd"]) == e.price, (rid, row["price_usd"], e.price)
    # unpriced: NULL, never 0; the translated request went to the anthropic provider
    assert {got[r.rid]["cost_usd"] for r in w.rows if r.model == "local-llama"} == {None}
    translated = [got[r.rid] for r in w.rows if r.endpoint == "chat" and r.model == "claude-sonnet"]
    assert [(t["provider"], t["upstream_model"]) for t in translated] == [
        ("anthropic", "claude-sonnet-5")
    ]

    # ---- per-user totals ------------------------------------------------------------------------
    totals = await sql(
        gw,
        "SELECT user_id, count(*) AS n, sum(input_tokens) AS inp, sum(output_tokens) AS out, "
        "sum(cost_usd) AS cost, sum(price_usd) AS price FROM usage GROUP BY user_id",
    )
    want_totals: dict[str | None, dict[str, Any]] = {}
    for e in w.rows:
        t = want_totals.setdefault(
            e.user, {"n": 0, "inp": 0, "out": 0, "cost": None, "price": Decimal(0)}
        )
        t["n"] += 1
        t["inp"] += e.inp
        t["out"] += e.out
        if e.cost is not None:  # SQL's sum skips NULLs and is NULL when all are
            t["cost"] = (t["cost"] or Decimal(0)) + e.cost
        t["price"] += e.price
    assert {
        t["user_id"]: {
            "n": t["n"],
            "inp": int(t["inp"]),
            "out": int(t["out"]),
            "cost": dec(t["cost"]),
            "price": dec(t["price"]),
        }
        for t in totals
    } == want_totals
    assert want_totals["alice"]["price"] > 0 and want_totals["bob"]["cost"] > 0

    months = {r["month"] for r in rows}
    assert len(months) == 1
    month = months.pop()

    # ---- invoices -------------------------------------------------------------------------------
    for user, tier in (("alice", "pro"), ("bob", "free"), ("carol", "trial")):
        url = f"{gw.url}/admin/invoices/{user}?month={month}"
        async with gw.http.get(url, headers=ADMIN) as r:
            assert r.status == 200
            raw1 = await r.read()
        async with gw.http.get(url, headers=ADMIN) as r:
            raw2 = await r.read()
        assert raw1 == raw2, "the same invoice twice, byte for byte"
        inv = orjson.loads(raw1)
        want = expected_invoice(user, tier, month, w.rows)
        assert inv["user"] == user and inv["month"] == month and inv["tier"] == tier
        assert inv["currency"] == "USD"
        assert inv["lines"] == want["lines"], user
        assert inv["total"] == want["total"], user
        assert Decimal(inv["total"]) == sum(Decimal(x["total"]) for x in inv["lines"])
        async with gw.http.get(url + "&format=csv", headers=ADMIN) as r:
            assert r.status == 200 and r.content_type == "text/csv"
            table = list(csv.DictReader(io.StringIO(await r.text())))
        assert [row["description"] for row in table] == [
            *(x["description"] for x in inv["lines"]),
            "Total",
        ]
        for row, line in zip(table, inv["lines"], strict=False):
            assert row["user"] == user and row["month"] == month
            assert row["service"] == line["service"]
            assert row["endpoint"] == (line["endpoint"] or "")
            assert row["feature"] == (line["feature"] or "")
            assert int(row["quantity"]) == line["quantity"]
            assert row["unit_price"] == line["unit_price"] and row["total"] == line["total"]
        assert table[-1]["total"] == inv["total"]
    alice_lines = {
        x["description"]: x for x in expected_invoice("alice", "pro", month, w.rows)["lines"]
    }
    code = alice_lines["AI API: chat / code_suggestions"]
    assert (code["quantity"], code["unit_price"], code["total"]) == (3, "0.015", "0.05")

    # ---- daily_usage ----------------------------------------------------------------------------
    daily = await sql(gw, "SELECT * FROM daily_usage")
    want_daily: dict[tuple[Any, ...], dict[str, Any]] = {}
    for e in w.rows:
        d = want_daily.setdefault(
            (e.user, e.tier, e.feature),
            {"requests": 0, "ok": 0, "cache_hits": 0, "inp": 0, "out": 0, "cost": None, "rev": 0},
        )
        d["requests"] += 1
        d["ok"] += e.status < 400
        d["inp"] += e.inp
        d["out"] += e.out
        if e.cost is not None:
            d["cost"] = (d["cost"] or Decimal(0)) + e.cost
        d["rev"] += e.price
    assert len({d["day"] for d in daily}) == 1 and daily[0]["day"] == rows[0]["day"]
    assert {
        (d["user_id"], d["tier"], d["feature"]): {
            "requests": d["requests"],
            "ok": d["ok"],
            "cache_hits": d["cache_hits"],
            "inp": int(d["input_tokens"]),
            "out": int(d["output_tokens"]),
            "cost": dec(d["cost_usd"]),
            "rev": dec(d["revenue_usd"]),
        }
        for d in daily
    } == want_daily

    # ---- kpis -----------------------------------------------------------------------------------
    (k,) = await sql(gw, "SELECT * FROM kpis")
    n = len(w.rows)
    ok_latency = [got[e.rid]["latency_ms"] for e in w.rows if e.status < 400]
    user_days = {(e.user, rows[0]["day"]) for e in w.rows}
    assert k["requests"] == n
    assert k["rate_limited"] == sum(e.status == 429 for e in w.rows) == 3
    assert k["unpriced_requests"] == 2  # the two local-llama answers (status < 400)
    errors = sum(e.status >= 500 for e in w.rows)
    assert errors == 2 and close(k["error_rate"], 100.0 * errors / n)
    assert close(k["avg_response_ms"], sum(ok_latency) / len(ok_latency))
    assert k["p95_response_ms"] is not None and 0 < k["p95_response_ms"] <= max(ok_latency)
    assert close(k["requests_per_user_per_day"], n / len(user_days))
    assert k["cache_hit_rate"] == 0  # no cache in the chain
    assert k["requests_per_second"] > 0

    # ---- business (this month) ------------------------------------------------------------------
    (b,) = await sql(gw, "SELECT * FROM business")
    users = {e.user: e.tier for e in w.rows if e.user is not None}
    mrr = sum((MONTHLY[t] for t in users.values()), Decimal(0))
    usage_revenue = sum((e.price for e in w.rows), Decimal(0))
    provider_cost = sum((e.cost or Decimal(0) for e in w.rows), Decimal(0))
    revenue = usage_revenue + mrr
    assert b["month"] == month
    assert b["requests"] == n
    assert b["active_users"] == len(users) == 3, "anonymous (401) requests are not a user"
    assert dec(b["mrr_usd"]) == mrr == Decimal(34)
    assert dec(b["usage_revenue_usd"]) == usage_revenue
    assert dec(b["revenue_usd"]) == revenue
    assert dec(b["provider_cost_usd"]) == provider_cost
    assert close(b["cost_per_request_usd"], float(provider_cost / n))
    assert close(b["profit_margin"], float(100 * (revenue - provider_cost) / revenue))
    assert b["churned_users"] == 0 and b["churn_rate"] is None
    assert b["customer_lifetime_value_usd"] is None


def _spool_row(rid: str, user: str, tier: str, ts: float) -> bytes:
    """A row as a previous gateway process left it in the spool (plugins.metering.row)."""
    return orjson.dumps(
        {
            "ts": ts,
            "request_id": rid,
            "final": True,
            "user_id": user,
            "key_id": "k_" + user,
            "tier": tier,
            "feature": "basic_suggestions",
            "endpoint": "chat",
            "provider": "openai",
            "model": "gpt-5.4-mini",
            "upstream_model": "gpt-5.4-mini",
            "stream": False,
            "status": 200,
            "error_code": None,
            "cache": None,
            "input_tokens": 10,
            "output_tokens": 20,
            "usage_estimated": False,
            "latency_ms": 5.0,
            "ttfb_ms": 4.0,
            "input_per_mtok": 0.25,
            "output_per_mtok": 2.0,
            "price": 0.01,
            "saved_input": 0,
            "saved_output": 0,
            "retries": 0,
            "client_ip_hash": "0" * 16,
        }
    )


async def test_business_churn_with_anonymous_requests(make_gateway: Any, tmp_path: Path) -> None:
    """Last month: ann and ben; this month: ann and a bad key. ben churned (1 of 2)."""
    db = tmp_path / "usage.duckdb"
    spool = tmp_path / "usage.spool"
    spool.mkdir()
    first = datetime.now(UTC).replace(day=1, hour=12, minute=0, second=0, microsecond=0)
    last_month = (first - timedelta(days=5)).timestamp()
    (spool / "000000000001.jsonl").write_bytes(
        _spool_row("req_old_ann", "ann", "pro", last_month)
        + b"\n"
        + _spool_row("req_old_ben", "ben", "pro", last_month)
        + b"\n"
    )
    gw = await make_gateway(chain(db), base=BASE)
    ann = gw.openai(await gw.create_key("ann", "pro"))
    reply = await ann.chat.completions.create(
        model="gpt-5.4-mini",
        messages=[{"role": "user", "content": "still here"}],  # type: ignore[list-item]
    )
    assert reply.usage is not None
    with pytest.raises(openai.AuthenticationError):
        await gw.openai("tw_bogus").chat.completions.create(
            model="gpt-5.4-mini",
            messages=[{"role": "user", "content": "who am i"}],  # type: ignore[list-item]
        )
    prev, cur = await sql(gw, "SELECT * FROM business ORDER BY month")
    assert prev["active_users"] == 2 and prev["churned_users"] == 0 and prev["churn_rate"] is None
    assert dec(prev["mrr_usd"]) == 58
    assert cur["requests"] == 2
    assert cur["active_users"] == 1
    assert dec(cur["mrr_usd"]) == 29
    assert cur["churned_users"] == 1
    assert close(cur["churn_rate"], 50.0)
    revenue = Decimal(29) + Decimal("0.01")
    assert dec(cur["revenue_usd"]) == revenue
    assert close(cur["customer_lifetime_value_usd"], float(revenue / 1 / Decimal("0.5")))


async def test_stream_abandoned_after_the_usage_chunk_keeps_the_provider_counts(
    metered: Gw,
) -> None:
    """The provider sent its counts before the client hung up: those are billed, not estimates."""
    gw = metered
    key = await gw.create_key("dora", "pro")
    msgs = [{"role": "user", "content": "five words in reply"}]
    body = {
        "model": "gpt-5.4-mini",
        "messages": msgs,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {
        "Authorization": f"Bearer {key}",
        "x-emulator-words": "5",
        "x-emulator-chunk-delay-ms": "100",  # [DONE] comes well after the usage chunk
    }
    usage = None
    async with gw.http.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status == 200
        rid = r.headers["x-request-id"]
        async for line in r.content:
            if line.startswith(b"data: {") and b'"usage":{' in line:
                usage = orjson.loads(line[6:])["usage"]
                break
        r.close()
    assert usage == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    await wait_for_rows(gw, [rid])
    (row,) = await sql(
        gw,
        "SELECT status, error_code, input_tokens, output_tokens, usage_estimated, cost_usd, "
        f"price_usd FROM usage WHERE request_id = '{rid}'",
    )
    assert row["error_code"] == "client_disconnected" and row["status"] == 200
    assert (row["input_tokens"], row["output_tokens"], row["usage_estimated"]) == (4, 5, False)
    assert dec(row["cost_usd"]) == cost_of("gpt-5.4-mini", 4, 5)
    assert dec(row["price_usd"]) == Decimal("0.01")
