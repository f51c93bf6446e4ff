"""What the batching tests share: a chain that records how each request was answered."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.context import RequestContext
from proxy.hookspecs import hookimpl
from tests.conftest import Emulator, Gw, policy

MSG = [{"role": "user", "content": "tell me the same thing"}]


class Seen:
    rows: list[tuple[str, int, str | None]] = []

    def __init__(self, config: Any, policy: Any) -> None:
        pass

    @hookimpl
    async def log(self, ctx: RequestContext) -> None:
        Seen.rows.append((ctx.request_id, ctx.status, ctx.shared))


def chain(**config: Any) -> list[dict[str, Any]]:
    """auth, seen, batching: ``config`` changes batching's (window 100ms, max_inputs 64)."""
    batching = {"window": "100ms", "max_inputs": 64, **config}
    return [{"name": "auth"}, {"name": "seen"}, {"name": "batching", "config": batching}]


@pytest.fixture
async def batched(make_gateway: Any, emulator: Emulator) -> tuple[Gw, str]:
    Seen.rows = []
    gw = await make_gateway(chain(), extra_plugins={"seen": Seen})
    await emulator.reset()
    return gw, await gw.create_key("bea", "pro")


FAST_TIMEOUT = policy(providers={"openai": {"timeout": {"read": "300ms"}}})


async def statuses(gw: Gw, path: str, bodies: list[Any], headers: dict[str, str]) -> list[Any]:
    """Send the bodies at once; (status, error code) of each reply, in order."""

    async def one(body: Any) -> Any:
        async with gw.http.post(f"{gw.url}{path}", json=body, headers=headers) as r:
            return r.status, (await r.json())["error"]["code"]

    return await asyncio.gather(*(one(b) for b in bodies))
