"""limits: config first, then plans, layers and admission through a running gateway."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from pydantic import ValidationError

from plugins.limits.plugin import LimitsConfig as Config
from plugins.limits.plugin import LimitsPlugin, compile_tiers, reset_string
from proxy.context import RequestContext
from proxy.hookspecs import hookimpl
from proxy.policy import Policy, Tier
from tests.conftest import Emulator, Gw, policy
from tests.plugins.limits.test_windows import Clock
from tests.procs import until

MSG = [{"role": "user", "content": "hi"}]
CHAT = {"model": "gpt-5.4-mini", "messages": MSG}

PLANS: dict[str, Any] = {
    "features": {
        "basic_suggestions": {"price_per_request": 0.01},
        "code_suggestions": {"price_per_request": 0.02},
        "custom": {"price_per_request": 0.05},
    },
    "tiers": {
        "free": {
            "requests_per_month": 1000,
            "requests_per_minute": 5,
            "features": ["basic_suggestions"],
            "models": ["gpt-5.4-mini"],
        },
        "pro": {
            "includes": "free",
            "requests_per_month": 25000,
            "requests_per_minute": 30,
            "features": ["code_suggestions"],
            "priority": 1,
        },
        "enterprise": {
            "includes": "pro",
            "requests_per_month": "unlimited",
            "requests_per_minute": 100,
            "features": ["custom"],
            "priority": 2,
        },
    },
}
BASE = {**policy(), **PLANS}  # the test policy with these plans instead of its own


def limits_chain(**config: str) -> str:
    lines = "".join(f"      {k}: {v}\n" for k, v in config.items())
    lines = lines or "      {}\n"
    return f"chain:\n  - name: auth\n  - name: limits\n    config:\n{lines}"


def short_plans(seconds: float) -> dict[str, Any]:
    """``extra_plugins`` for a limits plugin whose plans' per-minute window is ``seconds``
    long (not a policy key: production's minute is a minute)."""
    return {"limits": type("ShortTiers", (LimitsPlugin,), {"tier_period": seconds})}


# ---- config ---------------------------------------------------------------------------------


def test_config_validates_limit_strings() -> None:
    with pytest.raises(ValidationError) as info:
        Config.model_validate({"user": ["60/minute", "lots"]})
    assert "'lots' is not a limit" in str(info.value)
    with pytest.raises(ValidationError):
        Config.model_validate({"users": ["60/minute"]})
    cfg = Config.model_validate({"global": {"concurrent_requests": 2, "queue_timeout": "2s"}})
    assert cfg.global_ is not None and cfg.global_.queue_timeout == 2.0
    assert cfg.global_.queue_max_size == 1000


def test_tiers_inherit_features() -> None:
    tiers = {
        "free": Tier(features=["a"], requests_per_month=10, requests_per_minute=5),
        "pro": Tier(includes="free", features=["b"]),
        "ent": Tier(includes="pro", features=["c"], requests_per_month="unlimited"),
    }
    rules = compile_tiers(Policy(tiers=tiers), 60)
    assert rules["free"].features == {"a"}
    assert rules["pro"].features == {"a", "b"}
    assert rules["ent"].features == {"a", "b", "c"}
    assert rules["free"].monthly == 10 and rules["ent"].monthly is None
    assert rules["free"].per_minute is not None and rules["free"].per_minute.amount == 5


def test_perks_priority_and_custom_models() -> None:
    """priority_support: an earlier place in the queue; custom_models: the models marked
    custom, which other plans may not use (within their own allow-list, if they have one)."""
    policy = Policy(
        providers={"p": {"kind": "openai", "base_url": "http://x"}},  # type: ignore[dict-item]
        models={
            "std": {"provider": "p"},  # type: ignore[dict-item]
            "special": {"provider": "p", "custom": True},  # type: ignore[dict-item]
        },
        tiers={
            "free": Tier(),
            "pro": Tier(perks=["priority_support"]),
            "vip": Tier(perks=["priority_support", "custom_models"], priority=5),
            "listed": Tier(models=["std", "special"]),
        },
    )
    rules = compile_tiers(policy, 60)
    assert [rules[t].priority for t in ("free", "pro", "vip")] == [0, 1, 5]
    assert rules["free"].models == {"std"} and rules["listed"].models == {"std"}
    assert rules["vip"].models is None  # every model


async def test_custom_models_need_the_perk(make_gateway: Any) -> None:
    base = policy(
        BASE,
        models={"gpt-secret": {"provider": "openai", "custom": True, "input_per_mtok": 1}},
        tiers={"enterprise": {"perks": ["custom_models"]}},
    )
    gw = await make_gateway(limits_chain(), base=base)
    body = {"model": "gpt-secret", "messages": MSG}
    pro = await post(gw, await gw.create_key("pia", "pro"), body)
    assert pro.status == 403 and (await pro.json())["error"]["code"] == "model_not_in_plan"
    ent = await post(gw, await gw.create_key("eve", "enterprise"), body)
    assert ent.status == 200


def test_reset_string_format() -> None:
    assert reset_string(0.02) == "20ms"
    assert reset_string(1.0) == "1s"
    assert reset_string(360) == "6m0s"
    assert reset_string(3723) == "1h2m3s"


# ---- behaviour ------------------------------------------------------------------------------


async def post(gw: Gw, key: str, body: Any = None, **headers: str) -> aiohttp.ClientResponse:
    h = {"Authorization": f"Bearer {key}", **headers}
    async with gw.http.post(f"{gw.url}/v1/chat/completions", json=body or CHAT, headers=h) as r:
        await r.read()
        return r


async def test_free_plan_boundary_and_window(make_gateway: Any) -> None:
    gw = await make_gateway(limits_chain(), base=BASE, extra_plugins=short_plans(1.0))
    # the windows' time is the test's: it moves on when told to, never waited for
    clock = Clock(time.time())
    gw.gateway.runtime.chain.plugins[1].limiter.clock = clock
    key = await gw.create_key("fred", "free")
    client = gw.openai(key)
    for i in range(5):
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-5.4-mini", messages=MSG
        )  # type: ignore[arg-type]
        assert raw.headers["x-ratelimit-limit-requests"] == "5"
        assert raw.headers["x-ratelimit-remaining-requests"] == str(4 - i)
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="gpt-5.4-mini", messages=MSG)  # type: ignore[arg-type]
    assert info.value.code == "plan_rate_limit_exceeded"
    headers = info.value.response.headers
    # sliding-window counter: the 5 hits keep weighing on the next window for a fifth of it
    assert headers["retry-after"] in ("1", "2")
    assert headers["x-ratelimit-remaining-requests"] == "0"
    clock.t += float(headers["retry-after"]) + 0.05
    reply = await client.chat.completions.create(model="gpt-5.4-mini", messages=MSG)  # type: ignore[arg-type]
    assert reply.choices[0].message.content


async def test_ip_limit_spans_users_and_rejections_count_nothing(make_gateway: Any) -> None:
    gw = await make_gateway(
        limits_chain(ip="[2 per 10 second]", user="[1 per 10 second]"), base=BASE
    )
    a, b, c = [await gw.create_key(u, "pro") for u in "abc"]
    assert (await post(gw, a)).status == 200
    second = await post(gw, a)
    assert second.status == 429  # user layer; nothing consumed on the ip layer
    assert 1 <= int(second.headers["Retry-After"]) <= 20
    assert (await post(gw, b)).status == 200
    third = await post(gw, c)
    assert third.status == 429
    async with gw.http.post(
        f"{gw.url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {c}"}
    ) as r:
        assert (await r.json())["error"]["code"] == "ip_rate_limit_exceeded"


async def test_user_limit_spans_keys_of_one_user(make_gateway: Any) -> None:
    gw = await make_gateway(limits_chain(user="[3 per 10 second]"), base=BASE)
    k1, k2 = await gw.create_key("uma", "pro"), await gw.create_key("uma", "pro")
    other = await gw.create_key("otto", "pro")
    statuses = [(await post(gw, k)).status for k in (k1, k2, k1, k2)]
    assert statuses == [200, 200, 200, 429]
    assert (await post(gw, other)).status == 200
    with pytest.raises(anthropic.RateLimitError):
        await gw.anthropic(k1).messages.create(model="claude-sonnet", max_tokens=5, messages=MSG)  # type: ignore[arg-type]


async def test_features_and_model_allow_list(make_gateway: Any) -> None:
    gw = await make_gateway(limits_chain(), base=BASE)
    free, pro = await gw.create_key("f", "free"), await gw.create_key("p", "pro")
    assert (await post(gw, free)).status == 200  # default feature basic_suggestions
    with pytest.raises(openai.PermissionDeniedError) as info:
        await gw.openai(free).chat.completions.create(
            model="gpt-5.4-mini",
            messages=MSG,  # type: ignore[arg-type]
            extra_headers={"X-Tollway-Feature": "code_suggestions"},
        )
    assert info.value.code == "feature_not_in_plan"
    assert "code_suggestions" in info.value.message and "free" in info.value.message
    assert (await post(gw, pro, **{"X-Tollway-Feature": "code_suggestions"})).status == 200
    assert (await post(gw, pro, **{"X-Tollway-Feature": "basic_suggestions"})).status == 200
    assert (await post(gw, pro, **{"X-Tollway-Feature": "nonsense"})).status == 400
    # model allow-list: free may use gpt-5.4-mini only; pro inherits no list of its own
    with pytest.raises(openai.PermissionDeniedError) as info2:
        await gw.openai(free).chat.completions.create(model="claude-sonnet", messages=MSG)  # type: ignore[arg-type]
    assert info2.value.code == "model_not_in_plan"
    assert (await post(gw, pro, {"model": "claude-sonnet", "messages": MSG})).status == 200


async def test_monthly_quota_survives_restart(make_gateway: Any, tmp_path: Path) -> None:
    base = policy(BASE, state={"dir": tmp_path}, tiers={"free": {"requests_per_month": 3}})
    gw1 = await make_gateway(limits_chain(), base=base)
    key = await gw1.create_key("quinn", "free")
    assert (await post(gw1, key)).status == 200
    assert (await post(gw1, key, {"model": "nope", "messages": MSG})).status == 404  # not billed
    assert (await post(gw1, key)).status == 200
    await gw1.app.shutdown()
    await gw1.app.cleanup()
    gw2 = await make_gateway(limits_chain(), base=base)  # a restart: same state dir
    assert (await post(gw2, key)).status == 200  # the key survived too
    r = await post(gw2, key)
    assert r.status == 429
    async with gw2.http.post(
        f"{gw2.url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        body = await resp.json()
        retry = int(resp.headers["Retry-After"])
    assert body["error"]["code"] == "monthly_quota_exceeded"
    assert "resets at" in body["error"]["message"]
    assert 0 < retry <= 31 * 86400


async def test_revoked_key_is_refused_at_once(make_gateway: Any) -> None:
    gw = await make_gateway(limits_chain(), base=BASE)
    key = await gw.create_key("rev", "pro")
    assert (await post(gw, key)).status == 200
    admin = {"Authorization": "Bearer test-admin-key"}
    async with gw.http.get(f"{gw.url}/admin/keys", headers=admin) as r:
        listed = (await r.json())["data"]
    assert all("key" not in k and "sha256" not in k for k in listed)
    key_id = next(k["id"] for k in listed if k["user"] == "rev")
    async with gw.http.delete(f"{gw.url}/admin/keys/{key_id}", headers=admin) as r:
        assert r.status == 200
    assert (await post(gw, key)).status == 401


class Order:
    """Records the order in which requests reached the log phase (completion order)."""

    done: list[str] = []

    def __init__(self, config: Any, policy: Any) -> None:
        pass

    @hookimpl
    async def log(self, ctx: RequestContext) -> None:
        if ctx.principal is not None:
            Order.done.append(f"{ctx.principal.user_id}:{ctx.status}:{ctx.error_code}")


async def test_queue_admits_by_plan_priority(make_gateway: Any) -> None:
    Order.done = []
    chain = limits_chain(**{"global": "{concurrent_requests: 1, queue_max_size: 10}"})
    gw = await make_gateway(chain + "  - name: order\n", base=BASE, extra_plugins={"order": Order})
    keys = {u: await gw.create_key(u, u) for u in ("free", "pro", "enterprise")}
    blocker = await gw.create_key("blocker", "free")
    adm = gw.gateway.runtime.chain.plugins[1].admission
    first = asyncio.create_task(post(gw, blocker, **{"x-emulator-latency-ms": "300"}))
    await until(lambda: adm.in_flight == 1, what="the blocker holding the one slot")
    tasks = []
    for n, user in enumerate(("free", "pro", "enterprise"), 1):  # arrive in the worst order
        tasks.append(asyncio.create_task(post(gw, keys[user], **{"x-emulator-latency-ms": "30"})))
        await until(lambda n=n: adm.queued == n, what=f"{user} queued")
    assert gw.gateway.runtime.chain.plugins[1].admission.queued == 3
    assert [r.status for r in await asyncio.gather(first, *tasks)] == [200] * 4
    assert Order.done == [
        "blocker:200:None",
        "enterprise:200:None",
        "pro:200:None",
        "free:200:None",
    ]


async def test_full_queue_503_and_disconnect_frees_place(
    make_gateway: Any, emulator: Emulator
) -> None:
    Order.done = []
    chain = limits_chain(
        **{"global": "{concurrent_requests: 1, queue_max_size: 1, queue_timeout: 5s}"}
    )
    gw = await make_gateway(chain + "  - name: order\n", base=BASE, extra_plugins={"order": Order})
    key = await gw.create_key("q", "pro")
    adm = gw.gateway.runtime.chain.plugins[1].admission
    blocker = asyncio.create_task(post(gw, key, **{"x-emulator-latency-ms": "600"}))
    await until(lambda: adm.in_flight == 1, what="the blocker holding the one slot")
    # a queued client that hangs up leaves the queue at once
    with pytest.raises(asyncio.TimeoutError):
        await gw.http.post(
            f"{gw.url}/v1/chat/completions",
            json=CHAT,
            headers={"Authorization": f"Bearer {key}"},
            timeout=aiohttp.ClientTimeout(total=0.15),
        )
    await until(lambda: adm.queued == 0, 1.0, "the queue left at once (not at its timeout)")
    assert adm.queued == 0
    queued = asyncio.create_task(post(gw, key))
    await until(lambda: adm.queued == 1, what="one request queued")
    assert adm.queued == 1
    full = await post(gw, key)
    assert full.status == 503 and full.headers["Retry-After"] == "1"
    async with gw.http.post(
        f"{gw.url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        assert (await r.json())["error"]["code"] == "server_overloaded"
    assert (await blocker).status == 200 and (await queued).status == 200
    assert adm.in_flight == 0 and adm.queued == 0
    # rejections are visible to log hooks (metering) with status and reason
    assert "q:503:server_overloaded" in Order.done
    assert "q:499:client_disconnected" in Order.done


async def test_queue_timeout_is_503(make_gateway: Any) -> None:
    chain = limits_chain(
        **{"global": "{concurrent_requests: 1, queue_max_size: 5, queue_timeout: 100ms}"}
    )
    gw = await make_gateway(chain, base=BASE)
    key = await gw.create_key("t", "pro")
    adm = gw.gateway.runtime.chain.plugins[1].admission
    blocker = asyncio.create_task(post(gw, key, **{"x-emulator-latency-ms": "500"}))
    await until(lambda: adm.in_flight == 1, what="the blocker holding the one slot")
    t0 = time.monotonic()
    r = await post(gw, key)
    assert r.status == 503 and time.monotonic() - t0 < 0.45
    assert (await blocker).status == 200


async def test_200_concurrent_against_50_per_minute(make_gateway: Any) -> None:
    gw = await make_gateway(limits_chain(user="[50/minute]"), base=BASE)
    key = await gw.create_key("burst", "enterprise")
    statuses = await asyncio.gather(*(post(gw, key) for _ in range(200)))
    codes = [r.status for r in statuses]
    assert codes.count(200) == 50
    assert codes.count(429) == 150


async def test_tokens_per_minute_charged_after_reply(make_gateway: Any) -> None:
    base = policy(BASE, tiers={"pro": {"tokens_per_minute": 20}})
    gw = await make_gateway(limits_chain(), base=base, extra_plugins=short_plans(10.0))
    key = await gw.create_key("tok", "pro")
    long = {
        "model": "gpt-5.4-mini",
        "messages": [{"role": "user", "content": "one two three four " * 5}],
    }
    assert (await post(gw, key, long)).status == 200  # ~40 tokens, more than the 20 allowed
    async with gw.http.post(
        f"{gw.url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        assert r.status == 429
        assert (await r.json())["error"]["code"] == "plan_token_limit_exceeded"


async def test_limits_survive_a_reload(make_gateway: Any, tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    gw = await make_gateway(limits_chain(user="[2 per 30 second]"), base=BASE, path=path)
    key = await gw.create_key("rl", "pro")
    assert [(await post(gw, key)).status for _ in range(2)] == [200, 200]
    async with gw.http.post(
        f"{gw.url}/admin/reload", headers={"Authorization": "Bearer test-admin-key"}
    ) as r:
        assert r.status == 200
    assert (await post(gw, key)).status == 429  # the window carried over


async def test_ip_from_trusted_proxy_only(make_gateway: Any) -> None:
    base = policy(BASE, listen={"trusted_proxies": ["127.0.0.1/32"]})
    gw = await make_gateway(limits_chain(ip="[1 per 30 second]"), base=base)
    key = await gw.create_key("xf", "pro")
    # behind a trusted proxy, each forwarded client has its own per-IP window
    assert (await post(gw, key, **{"X-Forwarded-For": "203.0.113.7"})).status == 200
    assert (await post(gw, key, **{"X-Forwarded-For": "203.0.113.8"})).status == 200
    assert (await post(gw, key, **{"X-Forwarded-For": "198.51.100.1, 203.0.113.7"})).status == 429
    untrusted = policy(BASE, listen={"trusted_proxies": ["10.0.0.0/8"]})
    gw2 = await make_gateway(limits_chain(ip="[1 per 30 second]"), base=untrusted)
    key2 = await gw2.create_key("xf2", "pro")
    # from an untrusted peer X-Forwarded-For is ignored: a client cannot dodge its IP limit
    assert (await post(gw2, key2, **{"X-Forwarded-For": "203.0.113.7"})).status == 200
    assert (await post(gw2, key2, **{"X-Forwarded-For": "203.0.113.9"})).status == 429
