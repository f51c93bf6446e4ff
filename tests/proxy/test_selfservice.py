"""Self-service: a key holder's own usage (``GET /v1/tollway/usage``) and the page ``/usage``
in a real headless Chromium, checked against admin SQL for the same user."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

from proxy.context import Principal
from proxy.hookspecs import hookimpl
from tests.browser import chromium
from tests.conftest import ADMIN_KEY, Gw, policy

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ANN, BOB = "ann-4711", "bob-0815"

BASE = policy(
    features={"code_suggestions": {"price_per_request": 0.02}},
    tiers={"pro": {"features": ["code_suggestions"]}},
)


def chain(db: Path) -> str:
    return (
        "chain:\n  - name: auth\n  - name: limits\n    config: {}\n"
        "  - name: cache\n    config: {default_ttl: 1h}\n"
        f"  - name: metering\n    config: {{database: {db}}}\n"
    )


async def traffic(gw: Gw) -> tuple[str, str]:
    """Ann (pro): two features, two models, one cache hit; Bob (free): one feature, and one
    request refused (a feature outside his plan). Returns their keys."""
    ann, bob = await gw.create_key(ANN, "pro"), await gw.create_key(BOB, "free")
    code = {"X-Tollway-Feature": "code_suggestions"}
    for key, model, text, headers in (
        (ann, "gpt-5.4-mini", "one", {}),
        (ann, "gpt-5.4-mini", "one", {}),  # answered from the cache
        (ann, "gpt-5.4-mini", "two words", code),
        (ann, "claude-sonnet", "three more words", code),
        (bob, "gpt-5.4-mini", "four", {}),
    ):
        await gw.openai(key).chat.completions.create(
            model=model, messages=[{"role": "user", "content": text}], extra_headers=headers
        )
    async with gw.http.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "x"}]},
        headers={"Authorization": f"Bearer {bob}", **code},
    ) as r:
        assert r.status == 403  # not in the free plan: recorded, not billed
    return ann, bob


async def sql(gw: Gw, query: str) -> list[list[Any]]:
    async with gw.http.post(f"{gw.url}/admin/sql", json={"query": query}, headers=ADMIN) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["rows"]  # type: ignore[no-any-return]


async def admin_view(gw: Gw, user: str, month: str) -> dict[str, Any]:
    """The same user's month as the operator sees it: admin SQL and the admin invoice."""
    where = f"WHERE user_id = '{user}' AND status < 400 AND strftime(ts, '%Y-%m') = '{month}'"
    cols = "count(*), sum(input_tokens), sum(output_tokens), sum(price_usd)"
    by: dict[str, list[list[Any]]] = {}
    for name in ("feature", "model"):
        by[name] = await sql(
            gw, f"SELECT {name}, {cols} FROM usage {where} GROUP BY {name} ORDER BY {name}"
        )
    [total] = await sql(
        gw,
        f"SELECT {cols}, count(*) FILTER (WHERE cache = 'hit'), sum(saved_usd) FROM usage {where}",
    )
    async with gw.http.get(f"{gw.url}/admin/invoices/{user}?month={month}", headers=ADMIN) as r:
        assert r.status == 200
        invoice = await r.json()
    return {"by": by, "total": total, "invoice": invoice}


async def own(gw: Gw, headers: dict[str, str], query: str = "") -> tuple[int, Any, Any]:
    async with gw.http.get(f"{gw.url}/v1/tollway/usage{query}", headers=headers) as r:
        return r.status, r.headers, await r.json()


def rows(items: list[dict[str, Any]], name: str) -> list[list[Any]]:
    return [
        [i[name], i["requests"], i["input_tokens"], i["output_tokens"], Decimal(i["price_usd"])]
        for i in items
    ]


def sql_rows(got: list[list[Any]]) -> list[list[Any]]:
    return [[k, n, i, o, Decimal(p)] for k, n, i, o, p in got]


async def test_own_usage_equals_admin_sql(make_gateway: Any, tmp_path: Path) -> None:
    gw: Gw = await make_gateway(chain(tmp_path / "usage.duckdb"), base=BASE)
    ann, bob = await traffic(gw)
    status, headers, me = await own(gw, {"Authorization": f"Bearer {ann}"})
    assert status == 200
    assert headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    month = me["month"]
    want = await admin_view(gw, ANN, month)

    assert (me["user"], me["tier"]) == (ANN, "pro")
    usage = me["usage"]
    assert rows(usage["by_feature"], "feature") == sql_rows(want["by"]["feature"])
    assert rows(usage["by_model"], "model") == sql_rows(want["by"]["model"])
    n, inp, out, price, hits, saved = want["total"]
    assert [usage["requests"], usage["input_tokens"], usage["output_tokens"]] == [n, inp, out]
    assert Decimal(usage["price_usd"]) == Decimal(price)
    assert me["cache"]["hits"] == hits == 1
    assert Decimal(me["cache"]["saved_usd"]) == Decimal(saved) > 0
    # what the test knows independently: 2 basic requests at 0.01, 2 code ones at 0.02
    assert [(f["feature"], f["requests"]) for f in usage["by_feature"]] == [
        ("basic_suggestions", 2),
        ("code_suggestions", 2),
    ]
    assert Decimal(usage["price_usd"]) == Decimal("0.06")
    assert {m["model"] for m in usage["by_model"]} == {"gpt-5.4-mini", "claude-sonnet"}
    # the bill so far is the admin invoice of the month, and the quota counts every request
    assert me["bill"] == {k: v for k, v in want["invoice"].items() if k != "user"}
    assert me["bill"]["total"] == "29.06"
    q = me["quota"]
    assert (q["limit"], q["used"], q["left"]) == (25000, 4, 24996)
    assert q["resets_at"].endswith("-01T00:00:00Z")
    assert me["budget"] is None  # no budget plugin in this chain
    assert BOB not in json.dumps(me)

    # Bob sees his own: his refused request is not billed; free plan, no subscription
    _, _, him = await own(gw, {"x-api-key": bob})
    assert him["user"] == BOB and him["usage"]["requests"] == 1
    assert him["quota"]["used"] == 1 and him["bill"]["total"] == "0.01"
    assert ANN not in json.dumps(him)


async def test_no_other_users_data_and_clear_errors(make_gateway: Any, tmp_path: Path) -> None:
    gw: Gw = await make_gateway(chain(tmp_path / "usage.duckdb"), base=BASE)
    ann, _ = await traffic(gw)
    # there is no user parameter: one in the query is ignored, the key decides
    _, _, mine = await own(gw, {"Authorization": f"Bearer {ann}"})
    _, _, asked = await own(gw, {"Authorization": f"Bearer {ann}"}, f"?user={BOB}")
    assert asked["user"] == ANN and asked["usage"] == mine["usage"]

    status, headers, body = await own(gw, {"Authorization": "Bearer tw-not-a-key"})
    assert status == 401 and headers["Cache-Control"] == "no-store"
    assert body["error"]["code"] == "invalid_api_key" and set(body) == {"error"}
    status, _, body = await own(gw, {})
    assert status == 401 and body["error"]["type"] == "authentication_error"
    # an Anthropic client gets its own error shape
    status, _, body = await own(gw, {"x-api-key": "nope", "anthropic-version": "2023-06-01"})
    assert status == 401 and body["type"] == "error" and body["error"]["type"]

    page = await gw.http.get(f"{gw.url}/usage")
    html = await page.text()
    assert page.status == 200 and page.headers["Cache-Control"] == "no-store"
    csp = page.headers["Content-Security-Policy"]
    assert "connect-src 'self'" in csp and "form-action 'none'" in csp
    assert ANN not in html and "localStorage" not in html and "sessionStorage" not in html


async def test_without_auth_there_is_no_account(make_gateway: Any) -> None:
    gw: Gw = await make_gateway("chain:\n  - name: routing\n")
    status, _, body = await own(gw, {})
    assert status == 404 and "no auth plugin" in body["error"]["message"]


async def test_shared_quota_and_sink_redis(
    make_gateway: Any, redis_url: str, tmp_path: Path
) -> None:
    """Two instances on one Redis: the quota is the shared count; usage rows go to the meter,
    so this gateway says where they are instead of answering from a database it lacks."""
    gws = []
    for i in (1, 2):
        db, spool = tmp_path / "usage.duckdb", tmp_path / f"spool{i}"
        gws.append(
            await make_gateway(
                "chain:\n  - name: auth\n  - name: limits\n    config: {}\n"
                "  - name: metering\n"
                f"    config: {{sink: redis, database: {db}, spool_dir: {spool}}}\n",
                base=policy(BASE, state={"url": redis_url}),
            )
        )
    ann = await gws[0].create_key(ANN, "pro")
    for gw, text in ((gws[0], "a"), (gws[1], "b"), (gws[1], "c")):
        async with gw.http.post(
            f"{gw.url}/v1/chat/completions",
            json={"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": text}]},
            headers={"Authorization": f"Bearer {ann}"},
        ) as r:
            assert r.status == 200
    for gw in gws:
        status, _, me = await own(gw, {"Authorization": f"Bearer {ann}"})
        assert status == 200 and me["quota"]["used"] == 3 and me["quota"]["left"] == 24997
        assert me["usage"] is None and me["bill"] is None and me["cache"] is None
        assert any("meter" in n for n in me["notes"])


async def test_page_in_chromium_shows_the_admin_numbers(make_gateway: Any, tmp_path: Path) -> None:
    gw: Gw = await make_gateway(chain(tmp_path / "usage.duckdb"), base=BASE)
    ann, _ = await traffic(gw)
    _, _, me = await own(gw, {"Authorization": f"Bearer {ann}"})
    want = await admin_view(gw, ANN, me["month"])
    n, inp, out, price, hits, saved = want["total"]

    async with chromium(tmp_path / "profile") as page:
        await page.goto(f"{gw.url}/usage")
        await page.type_into("key", ann)
        await page.eval("document.getElementById('show').click()")
        await page.until("!document.getElementById('account').hidden")
        shown = await page.eval(
            "Object.fromEntries([...document.querySelectorAll('#account [id]')]"
            ".map(e => [e.id, e.textContent.trim()]))"
        )
        table = await page.eval(
            "[...document.querySelectorAll('#by_feature tr')]"
            ".map(tr => [...tr.children].map(td => td.textContent))"
        )
        dom = await page.eval("document.documentElement.outerHTML")
        where = await page.eval("location.href")
        stored = await page.eval(
            "JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])"
        )
        typed = await page.eval("document.getElementById('key').value")

        assert shown["user"] == ANN and shown["tier"] == "pro"
        assert shown["usage_requests"] == str(n)
        assert shown["usage_tokens"] == str(inp + out)
        assert Decimal(shown["usage_price"].lstrip("$")) == Decimal(price)
        assert shown["cache_hits"] == str(hits)
        assert Decimal(shown["cache_saved"].lstrip("$")) == Decimal(saved)
        assert shown["bill_total"] == "$" + want["invoice"]["total"]
        assert shown["quota_used"] == "4" and shown["quota_left"] == "24996"
        assert shown["budget_left"] == "no budget"
        assert [
            [r[0], int(r[1]), int(r[2]), int(r[3]), Decimal(r[4].lstrip("$"))] for r in table
        ] == (sql_rows(want["by"]["feature"]))
        # the key was typed and sent in a header: nowhere in the URL, the DOM or storage
        assert ann not in dom and ann not in where and ann not in stored and typed == ""
        assert where == f"{gw.url}/usage"

        # then a wrong key: an error, and nothing of the account shown before stays
        await page.type_into("key", "tw-wrong-key")
        await page.eval("document.getElementById('show').click()")
        await page.until("!document.getElementById('error').hidden")
        assert await page.eval("document.getElementById('account').hidden")
        assert "not valid" in await page.eval("document.getElementById('error').textContent")
        dom = await page.eval("document.documentElement.outerHTML")
        assert ANN not in dom and "code_suggestions" not in dom and "29.06" not in dom

        # a fresh page given only a wrong key shows nothing but the error
        await page.goto(f"{gw.url}/usage?x=1")
        await page.type_into("key", "tw-wrong-key")
        await page.eval("document.getElementById('show').click()")
        await page.until("!document.getElementById('error').hidden")
        assert await page.eval("document.querySelectorAll('#account tr td').length") == 0
        assert await page.eval("document.getElementById('user').textContent") == ""


async def test_budget_from_the_budgets_plugin(make_gateway: Any, tmp_path: Path) -> None:
    """With the budgets plugin in the chain, the budget section is its account of the month;
    on the price basis what was spent is what the usage section says the customer pays."""
    base = policy(BASE, tiers={"pro": {"budget": {"usd": 5, "basis": "price"}}})
    gw: Gw = await make_gateway(
        "chain:\n  - name: auth\n  - name: limits\n    config: {}\n  - name: budgets\n"
        "  - name: cache\n    config: {default_ttl: 1h}\n"
        f"  - name: metering\n    config: {{database: {tmp_path / 'usage.duckdb'}}}\n",
        base=base,
    )
    ann, _ = await traffic(gw)
    _, _, me = await own(gw, {"Authorization": f"Bearer {ann}"})
    budget = me["budget"]
    assert budget["budget"]["usd"] == 5
    assert Decimal(str(budget["spent_usd"])) == Decimal(me["usage"]["price_usd"]) == Decimal("0.06")
    assert Decimal(str(budget["left_usd"])) == Decimal("4.94")

    async with chromium(tmp_path / "profile") as page:
        await page.goto(f"{gw.url}/usage")
        await page.type_into("key", ann)
        await page.eval("document.getElementById('show').click()")
        await page.until("!document.getElementById('account').hidden")
        shown = await page.eval(
            "['budget_left', 'budget_spent', 'budget_limit']"
            ".map(id => document.getElementById(id).textContent)"
        )
        assert shown == ["$4.94", "$0.06", "$5.00"]


class Broken:
    """A plugin whose part of the account fails."""

    def __init__(self, config: Any, policy: Any) -> None:
        pass

    @hookimpl
    async def account_report(self, principal: Principal, month: str) -> dict[str, Any]:
        raise RuntimeError("the plugin's store is down")


class Greedy:
    """A plugin that tries to replace sections an earlier one (and the core) gave."""

    def __init__(self, config: Any, policy: Any) -> None:
        pass

    @hookimpl
    async def account_report(self, principal: Principal, month: str) -> dict[str, Any]:
        return {"quota": "replaced", "user": "someone-else", "extra": {"n": 1}}


async def test_a_failing_plugin_costs_only_its_part(make_gateway: Any, tmp_path: Path) -> None:
    gw: Gw = await make_gateway(
        "chain:\n  - name: auth\n  - name: limits\n    config: {}\n  - name: broken\n"
        "  - name: greedy\n",
        extra_plugins={"broken": Broken, "greedy": Greedy},
    )
    ann = await gw.create_key(ANN, "pro")
    status, _, me = await own(gw, {"Authorization": f"Bearer {ann}"})
    assert status == 200
    assert me["quota"]["limit"] == 25000 and me["user"] == ANN  # the earlier part stands
    assert me["extra"] == {"n": 1} and me["usage"] is None
    assert me["notes"] == ["part of this report is unavailable (broken)"]
