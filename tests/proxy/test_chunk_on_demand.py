"""``response_chunk`` hooks marked ``@on_demand``: called, and a stream's events parsed for
them, only on requests a plugin asked for (``ctx.parse_events``), through a running gateway.

The cache is the built-in user: it records the events of a stream it may store, and a stream
it bypasses (a feature without a TTL, ``no-store``) is relayed as the provider sent it.
"""

from __future__ import annotations

from typing import Any

import pytest

from proxy.chain import compile_chain
from proxy.context import RequestContext, StreamEvent
from proxy.hookspecs import hookimpl, on_demand
from proxy.policy import PolicyError, load_text
from tests.conftest import BASE_POLICY, Gw

KEY = "c" * 64
PLANS = """
features:
  cached: {price_per_request: 0.01}
  private: {price_per_request: 0.01}
tiers:
  pro: {requests_per_month: 25000}
"""
BASE = BASE_POLICY.split("features:")[0] + PLANS.replace("{", "{{").replace("}", "}}")


def spies(seen: list[str]) -> dict[str, Any]:
    """``asker``: asks for the events of requests with ``X-Want-Events``; ``watch``: an
    on-demand chunk hook that marks every event it sees; ``always``: a plain chunk hook."""

    class Asker:
        def __init__(self, config: Any, policy: Any) -> None:
            pass

        @hookimpl
        async def access(self, ctx: RequestContext) -> None:
            if "x-want-events" in ctx.request.headers:
                ctx.parse_events = True

    class Watch:
        def __init__(self, config: Any, policy: Any) -> None:
            pass

        @hookimpl
        @on_demand
        def response_chunk(self, ctx: RequestContext, event: StreamEvent) -> None:
            seen.append(f"watch {ctx.feature}")
            if isinstance(event.data, dict):
                event.data["x_watched"] = True  # reaches the client only if the hook ran

    class Always:
        def __init__(self, config: Any, policy: Any) -> None:
            pass

        @hookimpl
        def response_chunk(self, ctx: RequestContext, event: StreamEvent) -> None:
            seen.append("always")

    return {"asker": Asker, "watch": Watch, "always": Always}


async def stream_raw(gw: Gw, key: str, text: str, headers: dict[str, str]) -> bytes:
    body = {
        "model": "gpt-5.4-mini",
        "stream": True,
        "messages": [{"role": "user", "content": text}],
    }
    auth = {"Authorization": f"Bearer {key}", **headers}
    async with gw.http.post(f"{gw.url}/v1/chat/completions", json=body, headers=auth) as r:
        assert r.status == 200
        raw = await r.read()
    assert raw.rstrip().endswith(b"data: [DONE]")
    return raw


async def test_on_demand_hook_runs_only_when_asked(make_gateway: Any) -> None:
    seen: list[str] = []
    gw = await make_gateway(
        "chain:\n  - name: auth\n  - name: watch\n  - name: asker\n",
        base=BASE,
        extra_plugins=spies(seen),
    )
    assert not gw.gateway.runtime.chain.chunks_always
    key = await gw.create_key("dana", "pro")
    raw = await stream_raw(gw, key, "not asked", {})
    assert seen == [] and b"x_watched" not in raw and raw.count(b"data: ") > 2
    raw = await stream_raw(gw, key, "asked", {"X-Want-Events": "1"})
    # every event relayed was edited (the usage chunk it did not ask for is seen, withheld)
    assert 2 < raw.count(b"data: {") == raw.count(b'"x_watched":true') <= len(seen)


async def test_a_plain_chunk_hook_makes_every_hook_run(make_gateway: Any) -> None:
    """With a hook that is not on demand the events are parsed anyway: the on-demand one
    runs too (it checks its own stash), as before ``@on_demand`` existed."""
    seen: list[str] = []
    gw = await make_gateway(
        "chain:\n  - name: auth\n  - name: watch\n  - name: always\n",
        base=BASE,
        extra_plugins=spies(seen),
    )
    assert gw.gateway.runtime.chain.chunks_always
    key = await gw.create_key("dana", "pro")
    raw = await stream_raw(gw, key, "plain", {})
    assert seen.count("always") > 2 and seen.count("always") == len(seen) // 2
    assert b"x_watched" in raw


async def test_cache_asks_only_for_streams_it_may_store(make_gateway: Any) -> None:
    """``watch`` above the cache sees a stream's events exactly when the cache records it."""
    seen: list[str] = []
    gw = await make_gateway(
        "chain:\n  - name: auth\n  - name: watch\n  - name: cache\n"
        f"    config: {{key: '{KEY}', ttl: {{cached: 1h}}, never: [private]}}\n",
        base=BASE,
        extra_plugins=spies(seen),
    )
    key = await gw.create_key("erin", "pro")
    await stream_raw(gw, key, "bypassed", {"X-Tollway-Feature": "private"})
    assert seen == []  # no TTL: bypassed, relayed unparsed
    await stream_raw(
        gw, key, "no store", {"X-Tollway-Feature": "cached", "Cache-Control": "no-store"}
    )
    assert seen == []  # a miss it will not store: nothing to record
    first = await stream_raw(gw, key, "stored", {"X-Tollway-Feature": "cached"})
    assert seen and set(seen) == {"watch cached"}
    seen.clear()
    again = await stream_raw(gw, key, "stored", {"X-Tollway-Feature": "cached"})
    assert seen == []  # a hit, replayed from the recorded stream: nothing relayed
    assert first.count(b"data: ") > 2 and again.count(b"data: ") > 2


def test_on_demand_is_for_response_chunk_only() -> None:
    class Odd:
        def __init__(self, config: Any, policy: Any) -> None:
            pass

        @hookimpl
        @on_demand
        async def access(self, ctx: RequestContext) -> None:
            return None

    policy = load_text(
        "version: 1\nproviders: {p: {kind: openai, base_url: 'http://x/v1'}}\n"
        "models: {m: {provider: p}}\nchain:\n  - name: odd\n"
    )
    with pytest.raises(PolicyError, match="access cannot be @on_demand"):
        compile_chain(policy, extra_plugins={"odd": Odd})
