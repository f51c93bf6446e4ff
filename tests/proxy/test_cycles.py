"""Requests leave no reference cycles behind.

A request whose objects form a cycle is freed only by the cyclic garbage collector, which then
has to walk the whole request graph (aiohttp's request, headers, streams, the context) for every
request: measured under load, that was the single largest cost of the full chain. So every
request shape, through the whole shipped chain, must be freed by reference counting alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.context import RequestContext
from proxy.hookspecs import hookimpl
from tests.conftest import BASE_POLICY, Gw
from tests.procs import until

SEEN: list[weakref.ref[RequestContext]] = []


class Watcher:
    """Keeps a weak reference to every request context it sees."""

    def __init__(self, config: Any, policy: Any) -> None:
        pass

    @hookimpl
    async def log(self, ctx: RequestContext) -> None:
        SEEN.append(weakref.ref(ctx))


def chain(tmp: Path) -> str:
    return (
        "chain:\n  - name: watcher\n  - name: auth\n  - name: limits\n    config: {}\n"
        "  - name: cache\n    config: {key: 'abababababababababababababababababababababababababababababababab', default_ttl: 1h}\n"
        "  - name: batching\n    config: {window: 20ms}\n"
        f"  - name: metering\n    config: {{database: {tmp / 'u.duckdb'}}}\n"
    )


async def traffic(gw: Gw, key: str) -> None:
    client = gw.openai(key)
    msg = [{"role": "user", "content": "cycles?"}]
    for _ in range(2):  # a miss, then a hit
        await client.chat.completions.create(model="gpt-5.4-mini", messages=msg)  # type: ignore[arg-type]
        stream = await client.chat.completions.create(
            model="gpt-5.4-mini",
            messages=[{"role": "user", "content": "streamed"}],  # type: ignore[list-item]
            stream=True,
        )
        async for _ in stream:
            pass
    same = [{"role": "user", "content": "together"}]
    await asyncio.gather(
        *(client.chat.completions.create(model="gpt-5.4-mini", messages=same) for _ in range(5))  # type: ignore[arg-type]
    )
    await asyncio.gather(
        *(client.embeddings.create(model="text-embedding-3-small", input=f"e{i}") for i in range(3))
    )
    await gw.anthropic(key).messages.create(
        model="claude-sonnet", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
    )
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=msg)  # type: ignore[arg-type]
    with pytest.raises(openai.AuthenticationError):
        await gw.openai("tw_wrong").chat.completions.create(model="gpt-5.4-mini", messages=msg)  # type: ignore[arg-type]


async def test_requests_are_freed_without_the_cycle_collector(
    make_gateway: Any, tmp_path: Path
) -> None:
    gw = await make_gateway(chain(tmp_path), base=BASE_POLICY, extra_plugins={"watcher": Watcher})
    key = await gw.create_key()
    SEEN.clear()
    gc.collect()
    gc.disable()
    try:
        await traffic(gw, key)
        # let finished handlers (log hooks run after the reply is out) and shared tasks
        # unwind; a context caught in a reference cycle never dies while the GC is off
        with contextlib.suppress(AssertionError):  # the assertions below say what is left
            await until(lambda: len(SEEN) >= 15 and all(ref() is None for ref in SEEN), 2.0)
        assert len(SEEN) >= 15
        alive = [ref() for ref in SEEN if ref() is not None]
        detail = [(c.endpoint, c.status, c.cache, c.shared) for c in alive]
        assert not alive, f"request contexts kept alive by reference cycles: {detail}"
    finally:
        gc.enable()
