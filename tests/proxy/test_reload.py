"""Hot reload: a valid policy swaps atomically, in-flight requests finish on the old chain,
an invalid policy is refused with its errors while the old one keeps serving."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from proxy.context import RequestContext
from proxy.hookspecs import hookimpl
from tests.conftest import ADMIN_KEY, Gw, policy_text
from tests.procs import until

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
EVENTS: list[str] = []


class Tracker:
    """Records its lifespan and which chain generation served each request."""

    generation = 0

    def __init__(self, config: Any, policy: Any) -> None:
        Tracker.generation += 1
        self.gen = Tracker.generation

    @hookimpl
    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        EVENTS.append(f"start{self.gen}")
        yield
        EVENTS.append(f"stop{self.gen}")

    @hookimpl
    async def log(self, ctx: RequestContext) -> None:
        EVENTS.append(f"served-by{self.gen}:{ctx.status}")


async def models(gw: Gw, key: str) -> list[str]:
    return [m.id async for m in gw.openai(key).models.list()]


async def test_reload_swaps_and_old_chain_drains(make_gateway: Any, tmp_path: Path) -> None:
    EVENTS.clear()
    Tracker.generation = 0
    path = tmp_path / "policy.yaml"
    gw = await make_gateway(
        "chain:\n  - name: auth\n  - name: tracker\n", path=path, extra_plugins={"tracker": Tracker}
    )
    key = await gw.create_key()
    assert "gpt-5.5" not in await models(gw, key)

    slow = asyncio.create_task(
        gw.openai(key).chat.completions.create(
            model="gpt-5.4-mini",
            messages=[{"role": "user", "content": "slow"}],
            extra_headers={"x-emulator-latency-ms": "400"},
        )
    )
    chain1 = gw.gateway.runtime.chain
    await until(lambda: chain1.in_flight == 1, what="the slow request in flight on chain 1")

    edited = yaml.safe_load(path.read_text())
    edited["models"]["gpt-5.5"] = {"provider": "openai", "input_per_mtok": 1.25}
    path.write_text(policy_text(edited))
    async with gw.http.post(f"{gw.url}/admin/reload", headers=ADMIN) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["plugins"] == ["auth", "tracker"]
    assert "gpt-5.5" in await models(gw, key)  # new requests see the new policy at once
    assert "stop1" not in EVENTS  # chain 1 still has a request in flight

    reply = await slow
    assert reply.choices[0].message.content
    await until(lambda: "stop1" in EVENTS, what="chain 1 closed once drained")
    assert EVENTS.index("start2") < EVENTS.index("served-by1:200") < EVENTS.index("stop1")
    # keys issued before the reload still work (the key store outlives chains)
    assert "gpt-5.5" in await models(gw, key)


async def test_invalid_reload_is_refused_and_old_policy_serves(
    make_gateway: Any, tmp_path: Path
) -> None:
    path = tmp_path / "policy.yaml"
    gw = await make_gateway(path=path)
    key = await gw.create_key()
    good = path.read_text()
    path.write_text(good + "    config: {keys: [{id: x}]}\nbogus: 1\n")
    async with gw.http.post(f"{gw.url}/admin/reload", headers=ADMIN) as r:
        assert r.status == 400
        errors = (await r.json())["errors"]
    assert any(e.startswith("bogus: unknown key (line") for e in errors)
    assert "gpt-5.4-mini" in await models(gw, key)
    assert gw.gateway.reloads == 0


async def test_reload_requires_admin_key(make_gateway: Any, tmp_path: Path) -> None:
    gw = await make_gateway(path=tmp_path / "p.yaml")
    async with gw.http.post(f"{gw.url}/admin/reload") as r:
        assert r.status == 401
    async with gw.http.post(
        f"{gw.url}/admin/reload", headers={"Authorization": "Bearer nope"}
    ) as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "invalid_admin_key"
