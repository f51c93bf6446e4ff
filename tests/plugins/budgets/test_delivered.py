"""Budget alerts reach a real receiver: a pro user's $5 budget with alerts at 80 % and 100 %,
the webhooks plugin posting to an HTTP server of the test, and the gateway restarted on the
same ``state.dir`` between the crossings and after them. Each occurrence is delivered once,
signed, whichever instance noticed it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import GatewayFactory, Gw, policy
from tests.plugins.budgets.conftest import CHAIN, Clock, at, events, plugin, priced
from tests.plugins.webhooks.test_webhooks import ENV, SECRET, Receiver, quiet, signed
from tests.plugins.webhooks.test_webhooks import receiver as receiver
from tests.procs import until

MSG = [{"role": "user", "content": "hello there"}]
NOW = at(2026, 12, 15)  # a fixed instant: the three gateways agree on the month


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, SECRET)


def chain(url: str) -> list[dict[str, Any]]:
    hooks = {
        "endpoints": [{"url": url, "secret": {"$env": ENV}, "kinds": ["budget.*"]}],
        "backoff": {"initial": "50ms", "max": "1s"},
    }
    return [*CHAIN[:2], {"name": "webhooks", "config": hooks}]


async def start(make_gateway: GatewayFactory, url: str, state: Path) -> Gw:
    base = policy(priced(pro={"budget": {"usd": 5, "alerts": [80, 100]}}), state={"dir": state})
    gw: Gw = await make_gateway(chain(url), base=base)
    plugin(gw).clock = Clock(NOW)
    return gw


async def stop(gw: Gw) -> None:
    """Shut the application down as ``tollway serve`` does on SIGTERM: files written."""
    await gw.app.shutdown()
    await gw.app.cleanup()


async def report(gw: Gw, key: str) -> int:
    """One $0.50 request (the ``report`` feature); its status (402 once the budget is spent)."""
    try:
        await gw.openai(key).chat.completions.create(
            model="gpt-5.4-mini",
            messages=MSG,  # type: ignore[arg-type]
            extra_headers={"X-Tollway-Feature": "report"},
        )
    except openai.APIStatusError as e:
        return e.status_code
    return 200


def delivered(rec: Receiver) -> list[tuple[str, object]]:
    return [(a.event["kind"], a.event["data"].get("percent")) for a in rec.accepted]


async def test_each_budget_alert_is_delivered_once_across_restarts(
    make_gateway: GatewayFactory, receiver: Receiver, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    gw1 = await start(make_gateway, receiver.url, state)
    key = await gw1.create_key("alice", "pro")
    assert [await report(gw1, key) for _ in range(8)] == [200] * 8  # $4.00: 80 %
    await until(lambda: len(receiver.accepted) >= 1, what="the 80 % delivery")
    await stop(gw1)

    # restarted between the crossings: the month's $4.00 is remembered, 80 % is not crossed again
    gw2 = await start(make_gateway, receiver.url, state)
    assert [await report(gw2, key) for _ in range(2)] == [200, 200]  # $5.00: 100 %
    assert await report(gw2, key) == 402  # budget.exceeded
    assert await report(gw2, key) == 402  # refused again: no second event
    await until(lambda: len(receiver.accepted) >= 3, what="the 100 % and exceeded deliveries")
    await quiet()
    await stop(gw2)

    # restarted after them: refused at once; budget.exceeded is noticed again, not sent again
    gw3 = await start(make_gateway, receiver.url, state)
    noticed = events(gw3)
    assert await report(gw3, key) == 402
    assert [e.dedupe for e in noticed] == ["budget:alice:2026-12:exceeded"]
    async with gw3.http.get(
        f"{gw3.url}/admin/budgets/alice", headers={"Authorization": "Bearer test-admin-key"}
    ) as r:
        shown = await r.json()
    assert (shown["month"], shown["spent_usd"], shown["reserved_usd"]) == ("2026-12", 5.0, 0)
    await quiet(0.5)

    assert delivered(receiver) == [
        ("budget.threshold", 80),
        ("budget.threshold", 100),
        ("budget.exceeded", None),
    ]
    assert len(receiver.attempts) == 3  # none failed, none repeated
    assert all(signed(a) for a in receiver.attempts)
    ids = [a.headers["Tollway-Event-Id"] for a in receiver.attempts]
    assert ids == [a.event["id"] for a in receiver.attempts] and len(set(ids)) == 3
    sent = [a.event for a in receiver.attempts]
    assert [e["subject"] for e in sent] == ["alice"] * 3
    assert [e["data"]["spent_usd"] for e in sent] == [4.0, 5.0, 5.0]
    assert all(e["data"]["month"] == "2026-12" and e["data"]["budget_usd"] == 5.0 for e in sent)
