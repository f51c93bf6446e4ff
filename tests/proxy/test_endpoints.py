"""The small endpoints: one model (``GET /v1/models/{id}``), Anthropic's paginated list, token
counting (``POST /v1/messages/count_tokens``), request ids for support tickets, and the
gateway's own 404 and 405 in each dialect's shape."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from anthropic.types import ModelInfo
from openai.types import Model

from proxy.counting import estimate_tokens
from tests.conftest import ADMIN_KEY, Emulator, Gw, policy

GATEWAY_ID = re.compile(r"^req_[0-9a-f]{24}$")
PROVIDER_ID = re.compile(r"^req_[0-9a-f]{20}$")  # the emulator's: req_ + 12 + 8 hex digits
MSG: list[Any] = [{"role": "user", "content": "count these five words please"}]

PLANS = policy(
    models={
        "house-model": {"provider": "openai", "custom": True, "input_per_mtok": 1},
        "acme/tuned": {"provider": "anthropic", "input_per_mtok": 1},
    },
    tiers={
        "free": {"models": ["gpt-5.4-mini", "house-model"]},
        "pro": {"perks": ["custom_models"]},
    },
)
ROUTING = [
    {"name": "auth"},
    {"name": "routing", "config": {"auto": {"cheap": "gpt-5.4-mini", "strong": "claude-sonnet"}}},
]


def strict(data: dict[str, Any], model: type[Any]) -> Any:
    """``data`` validated as the SDK type, with exactly the SDK type's fields (none missing,
    none unknown)."""
    assert set(data) == set(model.model_fields), sorted(set(data) ^ set(model.model_fields))
    return model.model_validate(data)


# ---- GET /v1/models/{id} and the lists ------------------------------------------------


async def test_retrieve_a_model_with_both_sdks(gw: Gw, key: str) -> None:
    raw = await gw.openai(key).models.with_raw_response.retrieve("gpt-5.4-mini")
    assert GATEWAY_ID.match(raw.headers["x-request-id"])
    model = strict(raw.http_response.json(), Model)
    assert (model.id, model.object, model.owned_by, model.created) == (
        "gpt-5.4-mini",
        "model",
        "openai",
        0,
    )
    araw = await gw.anthropic(key).models.with_raw_response.retrieve("claude-sonnet")
    info = strict(araw.http_response.json(), ModelInfo)
    assert (info.id, info.type, info.display_name, info.lifecycle) == (
        "claude-sonnet",
        "model",
        "claude-sonnet",
        "active",
    )
    assert info.created_at == datetime(1970, 1, 1, tzinfo=UTC)  # unknown: the epoch
    assert info.capabilities is None and info.max_tokens is None and info.line is None
    # an OpenAI model through the Anthropic SDK, as the list shows it
    assert (await gw.anthropic(key).models.retrieve("gpt-5.4-mini")).id == "gpt-5.4-mini"


async def test_unknown_model_is_a_404_in_each_shape(gw: Gw, key: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await gw.openai(key).models.retrieve("gpt-nothing")
    assert info.value.code == "model_not_found"
    assert GATEWAY_ID.match(info.value.request_id or "")
    with pytest.raises(anthropic.NotFoundError) as ainfo:
        await gw.anthropic(key).models.retrieve("claude-nothing")
    body = ainfo.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "not_found_error"
    assert GATEWAY_ID.match(ainfo.value.request_id or "")
    with pytest.raises(openai.AuthenticationError):
        await gw.openai("tw_wrong").models.retrieve("gpt-5.4-mini")
    with pytest.raises(anthropic.AuthenticationError):
        await gw.anthropic("tw_wrong").models.retrieve("claude-sonnet")


async def test_lists_validate_as_the_sdk_types(gw: Gw, key: str) -> None:
    async with gw.http.get(
        f"{gw.url}/v1/models", headers={"x-api-key": key, "anthropic-version": "2023-06-01"}
    ) as r:
        page = await r.json()
    assert (
        GATEWAY_ID.match(r.headers["request-id"])
        and r.headers["request-id"] == r.headers["x-request-id"]
    )
    assert [strict(m, ModelInfo).id for m in page["data"]] == [
        "gpt-5.4-mini",
        "claude-sonnet",
        "text-embedding-3-small",
    ]
    assert (page["has_more"], page["first_id"], page["last_id"]) == (
        False,
        "gpt-5.4-mini",
        "text-embedding-3-small",
    )
    async with gw.http.get(f"{gw.url}/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
        listed = await r.json()
    assert listed["object"] == "list"
    assert [strict(m, Model).owned_by for m in listed["data"]] == ["openai", "anthropic", "openai"]


async def test_anthropic_list_pages(gw: Gw, key: str) -> None:
    client = gw.anthropic(key)
    first = await client.models.list(limit=2)
    assert [m.id for m in first.data] == ["gpt-5.4-mini", "claude-sonnet"]
    assert first.has_more and first.last_id == "claude-sonnet"
    # the SDK follows after_id to the end
    assert [m.id async for m in await client.models.list(limit=1)] == [
        "gpt-5.4-mini",
        "claude-sonnet",
        "text-embedding-3-small",
    ]
    back = await client.models.list(before_id="text-embedding-3-small", limit=1)
    assert [m.id for m in back.data] == ["claude-sonnet"] and back.has_more
    retired = await client.models.list(lifecycle=["retired"])
    assert retired.data == [] and retired.first_id is None and not retired.has_more
    assert len((await client.models.list(lifecycle=["active", "deprecated"])).data) == 3
    for bad in ({"limit": 0}, {"limit": 1001}, {"after_id": "nope"}):
        with pytest.raises(anthropic.BadRequestError):
            await client.models.list(**bad)


async def test_models_follow_the_plan(make_gateway: Any) -> None:
    gw = await make_gateway(base=PLANS)
    free, pro = await gw.create_key("fay", "free"), await gw.create_key("pat", "pro")
    assert [m.id async for m in gw.openai(free).models.list()] == ["gpt-5.4-mini"]
    assert [m.id async for m in gw.anthropic(free).models.list()] == ["gpt-5.4-mini"]
    for name in ("claude-sonnet", "house-model"):  # not in the plan / custom without the perk
        with pytest.raises(openai.NotFoundError):
            await gw.openai(free).models.retrieve(name)
        with pytest.raises(anthropic.NotFoundError):
            await gw.anthropic(free).models.retrieve(name)
    listed = [m.id async for m in gw.openai(pro).models.list()]
    assert listed == [
        "gpt-5.4-mini",
        "claude-sonnet",
        "text-embedding-3-small",
        "house-model",
        "acme/tuned",
    ]
    assert (await gw.openai(pro).models.retrieve("house-model")).owned_by == "openai"
    # a name with a slash: the SDKs send it percent-encoded as one path segment
    assert (await gw.openai(pro).models.retrieve("acme/tuned")).owned_by == "anthropic"
    assert (await gw.anthropic(pro).models.retrieve("acme/tuned")).id == "acme/tuned"


async def test_auto_is_listed_and_retrieved(make_gateway: Any) -> None:
    gw = await make_gateway(ROUTING)
    key = await gw.create_key()
    assert (await gw.openai(key).models.retrieve("auto")).owned_by == "tollway"
    assert (await gw.anthropic(key).models.retrieve("auto")).lifecycle == "active"
    assert [m.id async for m in gw.anthropic(key).models.list()][-1] == "auto"


# ---- POST /v1/messages/count_tokens ---------------------------------------------------


async def test_count_tokens_of_a_claude_model_is_the_providers(
    gw: Gw, key: str, emulator: Emulator
) -> None:
    client = gw.anthropic(key)
    system = "be brief"
    raw = await client.messages.with_raw_response.count_tokens(
        model="claude-sonnet", system=system, messages=MSG
    )
    counted = await raw.parse()
    last = await emulator.last()
    assert last["path"] == "/v1/messages/count_tokens"
    assert last["body"]["model"] == "claude-sonnet-5"
    assert "x-tollway-count" not in raw.headers
    assert PROVIDER_ID.match(raw.headers["x-upstream-request-id"])
    message = await client.messages.create(
        model="claude-sonnet", system=system, max_tokens=20, messages=MSG
    )
    assert counted.input_tokens == message.usage.input_tokens == 7
    # the provider's refusal passes through in Anthropic's shape
    with pytest.raises(anthropic.BadRequestError) as info:
        await client.messages.count_tokens(
            model="claude-sonnet", messages=MSG, extra_body={"max_tokens": 5}
        )
    assert "max_tokens" in info.value.message


async def test_count_tokens_of_an_openai_model_is_an_estimate(
    gw: Gw, key: str, emulator: Emulator
) -> None:
    await emulator.reset()
    client = gw.anthropic(key)
    tools: list[Any] = [
        {
            "name": "weather",
            "description": "the weather in a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    raw = await client.messages.with_raw_response.count_tokens(
        model="gpt-5.4-mini", system="be brief", messages=MSG, tools=tools
    )
    assert raw.headers["x-tollway-count"] == "estimate"
    assert raw.headers["x-tollway-model"] == "gpt-5.4-mini"
    chars = len("be brief") + len(MSG[0]["content"]) + len("the weather in a city")
    assert (await raw.parse()).input_tokens == math.ceil(chars / 4) == 15
    assert (await emulator.stats())["requests"] == 0  # nothing reached a provider
    assert estimate_tokens({"messages": [{"role": "user", "content": ""}]}) == 1


async def test_count_tokens_errors_are_anthropic_shaped(gw: Gw, key: str) -> None:
    client = gw.anthropic(key)
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.count_tokens(model="claude-nothing", messages=MSG)
    with pytest.raises(anthropic.AuthenticationError) as auth:
        await gw.anthropic("tw_wrong").messages.count_tokens(model="claude-sonnet", messages=MSG)
    assert GATEWAY_ID.match(auth.value.request_id or "")
    with pytest.raises(anthropic.BadRequestError) as info:
        await client.messages.count_tokens(model="gpt-5.4-mini", messages=[])
    assert info.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    async with gw.http.post(
        f"{gw.url}/v1/messages/count_tokens",
        headers={"x-api-key": key, "content-type": "application/json"},
        data=b"[",
    ) as r:
        assert r.status == 400
        body = await r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"


async def test_count_tokens_is_free_but_rate_limited(make_gateway: Any, tmp_path: Path) -> None:
    """A zero-price row, no place in the monthly quota; the per-minute limit counts it."""
    base = policy(
        features={"code_suggestions": {"price_per_request": 0.02}},
        tiers={"free": {"requests_per_month": 2, "requests_per_minute": 4}},
    )
    db = tmp_path / "usage.duckdb"
    gw = await make_gateway(
        [
            {"name": "auth"},
            {"name": "limits"},
            {"name": "metering", "config": {"database": str(db), "flush_interval": "50ms"}},
        ],
        base=base,
    )
    key = await gw.create_key("cal", "free")
    client = gw.anthropic(key)
    for model in ("claude-sonnet", "gpt-5.4-mini", "claude-sonnet"):
        await client.messages.count_tokens(model=model, messages=MSG)
    with pytest.raises(anthropic.PermissionDeniedError):  # features apply
        await client.messages.count_tokens(
            model="claude-sonnet",
            messages=MSG,
            extra_headers={"X-Tollway-Feature": "code_suggestions"},
        )
    # three counts took no place in the quota of 2: a message still fits, and is the 4th
    # request in the minute; the 5th, a count, is over the per-minute limit of 4
    await client.messages.create(model="claude-sonnet", max_tokens=5, messages=MSG)
    with pytest.raises(anthropic.RateLimitError) as info:
        await client.messages.count_tokens(model="claude-sonnet", messages=MSG)
    assert "Rate limit reached for requests" in info.value.message
    async with gw.http.post(
        f"{gw.url}/admin/sql",
        json={"query": "SELECT endpoint, status, price_usd FROM usage ORDER BY ts"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ) as r:
        rows = [(e, s, float(p)) for e, s, p in (await r.json())["rows"]]
    # every count has a row, refused or not, at price 0 (tests/plugins/metering/test_zero_price.py)
    assert rows == [
        ("count_tokens", 200, 0.0),
        ("count_tokens", 200, 0.0),
        ("count_tokens", 200, 0.0),
        ("count_tokens", 403, 0.0),
        ("messages", 200, 0.01),
        ("count_tokens", 429, 0.0),
    ]


# ---- request ids ----------------------------------------------------------------------


async def test_the_emulator_sends_provider_request_ids(emulator: Emulator) -> None:
    auth = {"Authorization": "Bearer upstream-secret", "x-api-key": "upstream-secret"}
    body = {"model": "m", "messages": MSG}
    async with emulator.http.post(
        f"{emulator.url}/v1/chat/completions", json=body, headers=auth
    ) as r:
        assert PROVIDER_ID.match(r.headers["x-request-id"]) and "request-id" not in r.headers
    async with emulator.http.post(
        f"{emulator.url}/v1/messages", json={**body, "max_tokens": 5, "stream": True}, headers=auth
    ) as r:
        assert PROVIDER_ID.match(r.headers["request-id"]) and "x-request-id" not in r.headers
    async with emulator.http.post(f"{emulator.url}/v1/messages", json={}, headers=auth) as r:
        assert r.status == 400 and PROVIDER_ID.match(r.headers["request-id"])


async def test_sdk_request_ids_are_the_gateways_and_the_providers_is_beside(
    make_gateway: Any, tmp_path: Path
) -> None:
    gw = await make_gateway(
        [
            {"name": "auth"},
            {
                "name": "metering",
                "config": {"database": str(tmp_path / "u.duckdb"), "flush_interval": "50ms"},
            },
        ]
    )
    key = await gw.create_key()
    seen: dict[str, str | None] = {}
    chat = await gw.openai(key).chat.completions.with_raw_response.create(
        model="claude-sonnet", messages=MSG
    )
    assert chat.parse()._request_id == chat.headers["x-request-id"]
    seen[chat.headers["x-request-id"]] = chat.headers["x-upstream-request-id"]
    ant = gw.anthropic(key)
    raw = await ant.messages.with_raw_response.create(
        model="gpt-5.4-mini", max_tokens=5, messages=MSG
    )
    message = await raw.parse()
    assert message._request_id == raw.headers["x-request-id"] == raw.headers["request-id"]
    seen[raw.headers["x-request-id"]] = raw.headers["x-upstream-request-id"]
    async with ant.messages.stream(model="claude-sonnet", max_tokens=5, messages=MSG) as stream:
        await stream.get_final_message()
        headers = stream.response.headers
    assert headers["request-id"] == headers["x-request-id"]
    seen[headers["x-request-id"]] = headers["x-upstream-request-id"]
    with pytest.raises(anthropic.NotFoundError) as info:  # the gateway's own refusal
        await ant.messages.create(model="nothing", max_tokens=5, messages=MSG)
    assert info.value.request_id is not None
    assert "x-upstream-request-id" not in info.value.response.headers
    seen[info.value.request_id] = None
    for gateway_id, provider_id in seen.items():
        assert GATEWAY_ID.match(gateway_id)
        assert provider_id is None or PROVIDER_ID.match(provider_id)
    async with gw.http.post(
        f"{gw.url}/admin/sql",
        json={"query": "SELECT request_id, upstream_request_id FROM usage"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ) as r:
        rows = dict((await r.json())["rows"])
    assert rows == seen


# ---- the gateway's own 404 and 405 ----------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "dialect"),
    [
        ("GET", "/v1/nothing", {}, 404, "openai"),
        ("GET", "/v1/nothing", {"anthropic-version": "2023-06-01"}, 404, "anthropic"),
        ("POST", "/v1/messages/nothing", {}, 404, "anthropic"),
        ("GET", "/v1/chat/completions", {}, 405, "openai"),
        ("GET", "/v1/messages", {}, 405, "anthropic"),
        ("DELETE", "/v1/messages/count_tokens", {}, 405, "anthropic"),
        ("POST", "/v1/models", {}, 405, "openai"),
        ("PUT", "/v1/models/gpt-5.4-mini", {"anthropic-version": "2023-06-01"}, 405, "anthropic"),
    ],
)
async def test_own_404_and_405_in_the_dialects_shape(
    gw: Gw, method: str, path: str, headers: dict[str, str], status: int, dialect: str
) -> None:
    async with gw.http.request(method, gw.url + path, headers=headers) as r:
        assert r.status == status
        body = await r.json()
        rid = r.headers["X-Request-Id"]
    assert GATEWAY_ID.match(rid)
    if status == 405:
        assert "Allow" in r.headers
    if dialect == "anthropic":
        assert r.headers["request-id"] == rid
        assert body["type"] == "error"
        assert body["error"]["type"] == (
            "not_found_error" if status == 404 else "invalid_request_error"
        )
        assert set(body["error"]) == {"type", "message"}
    else:
        assert "request-id" not in r.headers
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == ("not_found" if status == 404 else "method_not_allowed")
