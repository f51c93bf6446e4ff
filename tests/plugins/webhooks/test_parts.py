"""webhooks: the config's errors, the queue file, the signature and Retry-After, on their own."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from plugins.webhooks import journal as journal_module
from plugins.webhooks.journal import Journal, Owed
from plugins.webhooks.outbox import event_id, payload, retry_after
from plugins.webhooks.signing import sign, verify
from proxy.events import Event
from tests.conftest import config_error


def test_config_errors_name_the_entry() -> None:
    err = config_error("webhooks", "{endpoints: [{url: 'ftp://x', secret: s}]}")
    assert "endpoints[0].url" in err and "not an http:// or https:// URL" in err
    err = config_error(
        "webhooks", "{endpoints: [{url: 'http://x/h', secret: s, kinds: [quota.treshold]}]}"
    )
    assert "endpoints[0].kinds" in err and "matches no event kind" in err
    err = config_error("webhooks", "{endpoints: [{url: 'http://x/h'}]}")
    assert "endpoints[0].secret" in err
    err = config_error(
        "webhooks",
        "{endpoints: [{url: 'http://x/h', secret: a}, {url: 'http://x/h', secret: b}]}",
    )
    assert "listed twice" in err
    err = config_error("limits", "{quota_alerts: [80, 150]}")
    assert "quota_alerts" in err and "150" in err


def test_a_kind_of_another_vendor_is_allowed() -> None:
    from plugins.webhooks.config import Endpoint

    e = Endpoint(url="https://h/x", secret="s", kinds=["acme.*", "budget.*"])  # type: ignore[arg-type]
    assert e.wants("acme.thing") and e.wants("budget.exceeded") and not e.wants("key.expired")
    assert e.shown == "https://h/x"
    assert Endpoint(url="https://u:p@h:8443/x?token=t", secret="s").shown == "https://h:8443/x"  # type: ignore[arg-type]


def test_signature_and_its_check() -> None:
    body = b'{"id":"evt_1"}'
    now = int(time.time())
    header = sign(b"k", body, now)
    assert header.startswith(f"t={now},v1=")
    assert verify(b"k", body, header)
    assert not verify(b"k", body + b" ", header)
    assert not verify(b"k", body, sign(b"k", body, now - 3600))  # stale: played again later
    assert not verify(b"k", body, "garbage")


def test_event_id_is_the_occurrence_and_payload_shape() -> None:
    a = Event("quota.threshold", "ann", "quota:ann:2026-05:80", {"percent": 80}, at=0.0)
    b = Event("quota.threshold", "ann", "quota:ann:2026-05:80", {"percent": 80}, at=5.0)
    assert event_id(a.dedupe) == event_id(b.dedupe) != event_id("quota:ann:2026-05:100")
    p = payload(a)
    assert p["created_at"] == "1970-01-01T00:00:00.000Z" and p["id"].startswith("evt_")


def test_retry_after_forms() -> None:
    now = time.time()
    assert retry_after("3", now) == 3.0
    assert retry_after(None, now) is None
    assert retry_after("soon", now) is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 60))
    wait = retry_after(date, now)
    assert wait is not None and 58 <= wait <= 61


async def test_journal_replays_skips_a_torn_line_and_compacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "webhooks.jsonl"
    j = Journal(path, keep=3600)
    for i in range(5):
        j.queue(Owed(f"k{i}", "ep", {"id": f"e{i}"}, time.time()))
    await j.sync()
    j.settle("k0", "delivered")
    j.settle("k1", "failed")
    await j.sync()
    with path.open("ab") as f:
        f.write(b'{"d": "k2", "r": "deliv')  # a crash in the middle of a line
    again = Journal(path, keep=3600)
    again.load()
    assert sorted(again.owed) == ["k2", "k3", "k4"]
    assert again.known("k0") and again.known("k1") and not again.known("k9")
    # once most of the file is history it is rewritten with only what is live
    assert path.read_bytes().endswith(b"\n")  # the cut line is gone: appends stay whole
    monkeypatch.setattr(journal_module, "COMPACT_MIN_LINES", 3)
    for key in ("k2", "k3"):
        again.settle(key, "delivered")
    await again.sync()  # 9 lines, 5 of them live (4 settled, 1 owed): rewritten
    again.settle("k5", "duplicate")
    await again.sync()
    lines = [orjson.loads(x) for x in path.read_bytes().splitlines()]
    assert len(lines) == 6  # 5 settled + 1 owed
    assert [x["q"] for x in lines if "q" in x] == ["k4"]
    third = Journal(path, keep=3600)
    third.load()
    assert list(third.owed) == ["k4"] and len(third.settled) == 5
    # a key settled longer ago than keep is forgotten
    old = Journal(path, keep=0.0)
    old.load()
    assert not old.settled


async def test_journal_a_delivery_taken_over_after_losing_its_claim_is_owed(
    tmp_path: Path,
) -> None:
    """This instance settled a delivery as a duplicate (another one claimed it), then took it
    over when that one died: owed again, in memory and after a restart."""
    path = tmp_path / "webhooks.jsonl"
    j = Journal(path, keep=3600)
    j.queue(Owed("k", "ep", {"id": "e"}, time.time()))
    j.settle("k", "duplicate")
    j.queue(Owed("k", "ep", {"id": "e"}, time.time()))  # taken over
    await j.sync()
    assert list(j.owed) == ["k"] and "k" not in j.settled
    again = Journal(path, keep=3600)
    again.load()
    assert list(again.owed) == ["k"] and "k" not in again.settled
    again.settle("k", "delivered")
    await again.sync()
    third = Journal(path, keep=3600)
    third.load()
    assert not third.owed and third.settled["k"][1] == "delivered"
