"""An issued key's lifecycle over HTTP: name, expiry, scopes, its own rate, labels in usage
rows, rotation with a grace period, a budget for the budget plugin, and the expiry events;
with both SDKs (each sees its own error shape), the admin API and ``tollway keys``."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest

from proxy.appkeys import RESOURCES
from proxy.events import EVENTS, Event, EventBus
from proxy.keystore import KeyRecord, KeyStore
from tests.conftest import ADMIN_KEY, Gw, policy
from tests.procs import run_tollway, until

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MSG = [{"role": "user", "content": "hi"}]
POLICY = policy(
    features={"basic_suggestions": {"price_per_request": 0.01}, "confidence_analysis": {}},
    tiers={
        "pro": {"features": ["confidence_analysis"]},
        "starter": {
            "requests_per_month": 100,
            "requests_per_minute": 10,
            "models": ["gpt-5.4-mini"],
            "features": ["basic_suggestions"],
        },
    },
)
LIMITS = [{"name": "auth"}, {"name": "limits"}]


async def admin(gw: Gw, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with gw.http.request(method, f"{gw.url}{path}", json=body, headers=ADMIN) as r:
        return r.status, await r.json()


async def made(gw: Gw, **body: Any) -> dict[str, Any]:
    status, out = await admin(gw, "POST", "/admin/keys", {"user": "ann", "tier": "pro", **body})
    assert status == 201, out
    return out  # type: ignore[no-any-return]


async def chat(gw: Gw, key: str, model: str = "gpt-5.4-mini", **headers: str) -> Any:
    return await gw.openai(key).chat.completions.create(
        model=model, messages=MSG, max_tokens=5, extra_headers=headers or None
    )


async def test_lifecycle_fields_are_stored_and_shown_never_the_secret(make_gateway: Any) -> None:
    gw = await make_gateway(LIMITS, base=POLICY)
    out = await made(
        gw,
        name="web frontend",
        expires_in="30d",
        scopes={"models": ["gpt-5.4-mini"], "features": ["basic_suggestions"]},
        rpm=3,
        labels={"project": "web", "env": "prod"},
        budget_usd=5,
    )
    assert out["key"].startswith("tw_")
    assert abs(out["expires_at"] - (time.time() + 30 * 86400)) < 60
    status, shown = await admin(gw, "GET", f"/admin/keys/{out['id']}")
    assert status == 200
    assert shown["name"] == "web frontend" and shown["rpm"] == 3 and shown["budget_usd"] == 5.0
    assert shown["scopes"] == {"models": ["gpt-5.4-mini"], "features": ["basic_suggestions"]}
    assert shown["labels"] == {"project": "web", "env": "prod"}
    assert "key" not in shown and "sha256" not in shown
    status, listed = await admin(gw, "GET", "/admin/keys?user=ann")
    assert [k["id"] for k in listed["data"]] == [out["id"]]
    assert out["key"] not in json.dumps(listed)
    status, nobody = await admin(gw, "GET", "/admin/keys?user=bob")
    assert nobody["data"] == []
    # the principal carries the attributes for the other plugins (budgets reads budget_usd)
    rec = gw.gateway.keystore.get(out["id"])
    assert rec is not None
    assert rec.attrs["budget_usd"] == 5.0 and rec.attrs["labels"] == {
        "project": "web",
        "env": "prod",
    }
    assert (await chat(gw, out["key"])).choices


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"rpm": 31}, "rpm", "more than plan 'pro' allows (30 per minute)"),
        ({"rpm": 0}, "rpm", "at least 1"),
        (
            {"tier": "starter", "scopes": {"models": ["claude-sonnet"]}},
            "scopes.models",
            "not included in plan 'starter'",
        ),
        ({"scopes": {"models": ["gpt-9"]}}, "scopes.models", "unknown model 'gpt-9'"),
        (
            {"tier": "starter", "scopes": {"features": ["confidence_analysis"]}},
            "scopes.features",
            "not included in plan 'starter'",
        ),
        ({"scopes": {"colours": ["red"]}}, "scopes", "'models' and/or 'features'"),
        ({"labels": {"bad key": "x"}}, "labels", "'bad key'"),
        ({"labels": {"project": 3}}, "labels", "must be a string"),
        ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at", "in the past"),
        ({"expires_in": "soon"}, "expires_in", "duration"),
        ({"expires_in": "1d", "expires_at": 4e9}, "expires_in", "choose one"),
        ({"budget_usd": -1}, "budget_usd", "non-negative"),
        ({"colour": "red"}, "colour", "unknown field"),
    ],
)
async def test_bad_lifecycle_fields_are_refused_naming_the_field(
    make_gateway: Any, body: dict[str, Any], param: str, says: str
) -> None:
    gw = await make_gateway(LIMITS, base=POLICY)
    status, out = await admin(gw, "POST", "/admin/keys", {"user": "ann", "tier": "pro", **body})
    assert status == 400, out
    assert out["error"]["param"] == param and says in out["error"]["message"]
    assert gw.gateway.keystore.list() == []


async def test_expired_key_is_refused_naming_when_in_both_shapes(make_gateway: Any) -> None:
    gw = await make_gateway(LIMITS, base=POLICY)
    out = await made(gw, expires_in="1s")
    assert (await chat(gw, out["key"])).choices  # valid until then

    async def expired() -> bool:
        await asyncio.sleep(0.25)  # a request per check against a plan of 30/minute
        try:
            await chat(gw, out["key"])
        except openai.AuthenticationError as e:
            assert e.code == "key_expired", e.body
            return True
        return False

    await until(expired, 5.0, "the key expiring")
    with pytest.raises(openai.AuthenticationError) as info:
        await chat(gw, out["key"])
    expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(out["expires_at"]))
    assert f"expired at {expected}" in info.value.message
    with pytest.raises(anthropic.AuthenticationError) as ant:
        await gw.anthropic(out["key"]).messages.create(
            model="claude-sonnet", max_tokens=5, messages=MSG
        )
    assert ant.value.body["error"]["type"] == "authentication_error"
    assert f"expired at {expected}" in ant.value.body["error"]["message"]
    # a new expiry brings it back (an update, not a new key)
    status, _ = await admin(gw, "PATCH", f"/admin/keys/{out['id']}", {"expires_in": "1h"})
    assert status == 200
    assert (await chat(gw, out["key"])).choices


async def test_scopes_refuse_other_models_and_features_naming_which(make_gateway: Any) -> None:
    gw = await make_gateway(LIMITS, base=POLICY)
    scoped = await made(gw, scopes={"models": ["gpt-5.4-mini"], "features": ["basic_suggestions"]})
    key = scoped["key"]
    assert (await chat(gw, key)).choices
    with pytest.raises(openai.PermissionDeniedError) as info:
        await chat(gw, key, "claude-sonnet")
    assert info.value.code == "key_scope" and info.value.param == "model"
    assert "model 'claude-sonnet' is outside this API key's scopes" in info.value.message
    with pytest.raises(openai.PermissionDeniedError) as info:
        await chat(gw, key, **{"X-Tollway-Feature": "confidence_analysis"})
    assert info.value.code == "key_scope"
    assert "feature 'confidence_analysis'" in info.value.message
    with pytest.raises(anthropic.PermissionDeniedError) as ant:
        await gw.anthropic(key).messages.create(model="claude-sonnet", max_tokens=5, messages=MSG)
    assert ant.value.body["error"]["type"] == "permission_error"
    assert "'claude-sonnet'" in ant.value.body["error"]["message"]
    # the plan allows both: an unscoped key of the same user uses them
    free = (await made(gw))["key"]
    assert (
        await chat(gw, free, "claude-sonnet", **{"X-Tollway-Feature": "confidence_analysis"})
    ).choices
    # widening the scope through the admin API takes effect at once
    status, shown = await admin(
        gw,
        "PATCH",
        f"/admin/keys/{scoped['id']}",
        {"scopes": {"models": ["gpt-5.4-mini", "claude-sonnet"]}},
    )
    assert status == 200 and shown["scopes"]["features"] is None
    assert (
        await chat(gw, key, "claude-sonnet", **{"X-Tollway-Feature": "confidence_analysis"})
    ).choices
    # a plan change re-checks the scopes: starter has no claude-sonnet
    status, out = await admin(gw, "PATCH", f"/admin/keys/{scoped['id']}", {"tier": "starter"})
    assert status == 400 and out["error"]["param"] == "scopes.models"


async def test_key_rate_is_its_own_layer(make_gateway: Any) -> None:
    gw = await make_gateway(LIMITS, base=POLICY)
    slow = await made(gw, rpm=2)
    assert (await chat(gw, slow["key"])).choices
    assert (await chat(gw, slow["key"])).choices
    with pytest.raises(openai.RateLimitError) as info:
        await chat(gw, slow["key"])
    assert info.value.code == "key_rate_limit_exceeded"
    assert "key: 2 per 60s" in info.value.message
    assert int(info.value.response.headers["retry-after"]) >= 1
    other = (await made(gw))["key"]  # the same user's other key: the plan's 30 a minute
    assert (await chat(gw, other)).choices
    status, _ = await admin(gw, "PATCH", f"/admin/keys/{slow['id']}", {"rpm": None})
    assert status == 200
    assert (await chat(gw, slow["key"])).choices  # the plan's rate again


async def test_labels_land_in_usage_rows(make_gateway: Any, tmp_path: Path) -> None:
    metering = {"name": "metering", "config": {"database": str(tmp_path / "u.duckdb")}}
    gw = await make_gateway([{"name": "auth"}, metering], base=POLICY)
    web = await made(gw, labels={"project": "web", "team": "growth"})
    plain = await made(gw)
    await chat(gw, web["key"])
    await chat(gw, plain["key"])
    status, out = await admin(
        gw,
        "POST",
        "/admin/sql",
        {"query": "SELECT key_id, labels['project'], labels FROM usage ORDER BY ts"},
    )
    assert status == 200, out
    assert out["rows"] == [
        [web["id"], "web", {"project": "web", "team": "growth"}],
        [plain["id"], None, None],
    ]


async def test_rotation_keeps_the_old_secret_for_the_grace_period(make_gateway: Any) -> None:
    gw = await make_gateway(LIMITS, base=POLICY)
    first = await made(gw, name="ci", labels={"project": "ci"})
    status, rotated = await admin(gw, "POST", f"/admin/keys/{first['id']}/rotate", {"grace": "1s"})
    assert status == 201, rotated
    assert rotated["id"] == first["id"] and rotated["key"] != first["key"]
    assert rotated["name"] == "ci" and rotated["labels"] == {"project": "ci"}
    assert rotated["previous_key_valid_until"] > time.time()
    assert (await chat(gw, rotated["key"])).choices
    assert (await chat(gw, first["key"])).choices  # within the grace period
    # an update during the grace period applies to the old secret too
    status, _ = await admin(
        gw, "PATCH", f"/admin/keys/{first['id']}", {"scopes": {"models": ["claude-sonnet"]}}
    )
    with pytest.raises(openai.PermissionDeniedError):
        await chat(gw, first["key"])

    async def old_refused() -> bool:
        await asyncio.sleep(0.25)
        try:
            await chat(gw, first["key"], "claude-sonnet")
        except openai.AuthenticationError as e:
            assert e.code == "key_expired"
            assert "replaced by a new one (rotation)" in e.message
            return True
        return False

    await until(old_refused, 5.0, "the grace period ending")
    assert (await chat(gw, rotated["key"], "claude-sonnet")).choices
    status, listed = await admin(gw, "GET", "/admin/keys")
    assert [k["id"] for k in listed["data"]] == [first["id"]]  # one key, not two
    # revoking takes every secret
    status, _ = await admin(gw, "DELETE", f"/admin/keys/{first['id']}")
    with pytest.raises(openai.AuthenticationError) as info:
        await chat(gw, rotated["key"])
    assert info.value.code == "invalid_api_key"


async def test_rotation_without_grace_ends_the_old_secret_at_once(make_gateway: Any) -> None:
    gw = await make_gateway(LIMITS, base=POLICY)
    first = await made(gw)
    status, rotated = await admin(gw, "POST", f"/admin/keys/{first['id']}/rotate", {"grace": 0})
    assert status == 201
    with pytest.raises(openai.AuthenticationError) as info:
        await chat(gw, first["key"])
    assert info.value.code == "key_expired"
    assert (await chat(gw, rotated["key"])).choices
    status, _ = await admin(gw, "POST", "/admin/keys/key_nothing/rotate", {})
    assert status == 404


async def test_expiry_events_once_per_threshold(make_gateway: Any) -> None:
    gw = await make_gateway([{"name": "auth", "config": {"expiry_check": "20ms"}}], base=POLICY)
    seen: list[Event] = []
    gw.app[RESOURCES].get(EVENTS, EventBus).subscribe(seen.append)
    week = await made(gw, expires_in="5d", name="weekly")
    day = await made(gw, expires_in="20h")
    soon = await made(gw, expires_in="1s")
    await made(gw)  # no expiry: no event

    def kinds() -> set[tuple[str, str, Any]]:
        return {(e.kind, e.data["key_id"], e.data.get("days")) for e in seen}

    await until(lambda: ("key.expired", soon["id"], None) in kinds(), 5.0, "key.expired")
    await until(lambda: len(seen) >= 4, 2.0, "the expiring events")
    assert kinds() == {
        ("key.expiring", week["id"], 7),
        ("key.expiring", day["id"], 1),
        ("key.expiring", soon["id"], 1),
        ("key.expired", soon["id"], None),
    }
    assert len(seen) == 4  # many checks ran: each event once
    by = {(e.kind, e.data["key_id"]): e for e in seen}
    weekly = by[("key.expiring", week["id"])]
    assert weekly.subject == "ann" and weekly.data["name"] == "weekly"
    assert weekly.dedupe == f"key.expiring:{week['id']}:{week['expires_at']:.0f}:7"
    assert (
        by[("key.expired", soon["id"])].dedupe
        == f"key.expired:{soon['id']}:{soon['expires_at']:.0f}"
    )


def test_a_key_file_of_an_older_version_loads_and_keeps_working(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    old = {
        "id": "key_old",
        "user": "olga",
        "tier": "pro",
        "sha256": "ab" * 32,
        "created": 1.0,
        "source": "api",
    }
    path.write_bytes(orjson.dumps({"keys": [old], "revoked": {}}))
    store = KeyStore(path)
    rec = store.get("key_old")
    assert rec is not None and rec.expires_at is None and rec.models is None and rec.attrs == {}
    store.update("key_old", name="renamed")
    again = KeyStore(path).get("key_old")
    assert again is not None and again.name == "renamed" and again.sha256 == "ab" * 32


def test_the_later_version_of_a_record_wins_a_merge(tmp_path: Path) -> None:
    """An instance that was away during an update must not bring the old version back (and
    hands its own newer version to a copy that holds an older one)."""
    store = KeyStore(tmp_path / "keys.json")
    rec, _ = store.create("ann", "pro", rpm=5)
    newer = store.update(rec.id, rpm=3)
    assert newer is not None
    missing, _ = store.merge([rec], {})  # the copy still has the first version
    assert store.get(rec.id) == newer and missing == [newer]
    newest = KeyRecord.from_dict({**newer.to_dict(), "rpm": 1, "updated": newer.updated + 1})
    missing, _ = store.merge([newest], {})
    assert store.get(rec.id) == newest and missing == []
    # a field a newer version of Tollway adds is ignored, not an error
    assert KeyRecord.from_dict({**newest.to_dict(), "colour": "red"}) == newest


async def test_cli_manages_the_whole_lifecycle(make_gateway: Any) -> None:
    gw = await make_gateway(LIMITS, base=POLICY)
    env = {"TOLLWAY_ADMIN_KEY": ADMIN_KEY}
    code, out = await run_tollway(
        "keys",
        "--url",
        gw.url,
        "create",
        "--user",
        "cli",
        "--tier",
        "pro",
        "--name",
        "batch",
        "--expires-in",
        "30d",
        "--models",
        "gpt-5.4-mini",
        "--rpm",
        "5",
        "--label",
        "project=web",
        "--label",
        "env=dev",
        "--budget-usd",
        "2.5",
        env=env,
    )
    assert code == 0, out
    created = json.loads(out)
    assert created["labels"] == {"project": "web", "env": "dev"} and created["rpm"] == 5
    key_id = created["id"]
    code, out = await run_tollway("keys", "--url", gw.url, "list", "--user", "cli", env=env)
    assert code == 0 and out.split("\t")[:5] == [key_id, "cli", "pro", "api", "batch"]
    code, out = await run_tollway(
        "keys",
        "--url",
        gw.url,
        "update",
        key_id,
        "--features",
        "basic_suggestions",
        "--clear",
        "rpm",
        env=env,
    )
    assert code == 0, out
    shown = json.loads(out)
    assert shown["scopes"] == {"models": ["gpt-5.4-mini"], "features": ["basic_suggestions"]}
    assert shown["rpm"] is None
    code, out = await run_tollway("keys", "--url", gw.url, "update", key_id, "--rpm", "99", env=env)
    assert code != 0 and "more than plan 'pro' allows" in out
    code, out = await run_tollway(
        "keys", "--url", gw.url, "rotate", key_id, "--grace", "1h", "-q", env=env
    )
    assert code == 0 and out.strip().startswith("tw_")
    assert (await chat(gw, out.strip())).choices
    assert (await chat(gw, created["key"])).choices  # the grace period
    code, out = await run_tollway("keys", "--url", gw.url, "show", key_id, env=env)
    assert code == 0 and json.loads(out)["previous_key_valid_until"] > time.time()
    assert created["key"] not in out


async def test_cli_offline_on_a_stopped_gateways_files(tmp_path: Path) -> None:
    code, out = await run_tollway(
        "keys",
        "--state-dir",
        str(tmp_path),
        "create",
        "--user",
        "off",
        "--tier",
        "pro",
        "--label",
        "project=api",
        "--expires-in",
        "7d",
    )
    assert code == 0, out
    key_id = json.loads(out)["id"]
    code, out = await run_tollway(
        "keys", "--state-dir", str(tmp_path), "rotate", key_id, "--grace", "0"
    )
    assert code == 0, out
    saved = orjson.loads((tmp_path / "keys.json").read_bytes())["keys"]
    assert [k["grace_until"] is not None for k in saved].count(True) == 1  # the old secret
    store = KeyStore(tmp_path / "keys.json")
    assert len(store.secrets_of(key_id)) == 1  # its grace (none) ended: pruned at load
    rec = store.get(key_id)
    assert rec is not None and rec.labels == {"project": "api"} and rec.rotated_at is not None
