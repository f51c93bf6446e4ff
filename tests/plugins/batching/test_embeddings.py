"""batching, embeddings: small embeddings requests merged into one call within a window."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.conftest import Emulator, policy
from tests.plugins.batching.conftest import FAST_TIMEOUT, Seen, chain, statuses
from tests.procs import until


async def test_twenty_embeddings_requests_one_call(make_gateway: Any, emulator: Emulator) -> None:
    # the twenty requests hold 30 inputs: a batch of exactly 30 goes when its last one
    # arrives, however long twenty SDK requests take on a busy machine (the window is a
    # bound that is never reached, not a guess of how long they take)
    gw = await make_gateway(chain(window="60s", max_inputs=30), extra_plugins={"seen": Seen})
    await emulator.reset()
    client = gw.openai(await gw.create_key("bea", "pro"))
    texts = [
        [f"text number {i}"] if i % 2 else [f"text number {i}", f"second {i}"] for i in range(20)
    ]
    results = await asyncio.gather(
        *(client.embeddings.create(model="text-embedding-3-small", input=t) for t in texts)
    )
    assert (await emulator.stats())["requests"] == 1
    # each caller got its own vectors: the same as asking the emulator for that input alone
    async with aiohttp.ClientSession() as s:
        for inputs, res in zip(texts, results, strict=True):
            assert len(res.data) == len(inputs)
            async with s.post(
                f"{emulator.url}/v1/embeddings",
                json={"model": "text-embedding-3-small", "input": inputs},
                headers={"Authorization": "Bearer upstream-secret"},
            ) as r:
                direct = await r.json()
            for got, want in zip(res.data, direct["data"], strict=True):
                assert got.index == want["index"]
                assert got.embedding == pytest.approx(want["embedding"], rel=1e-6)
            assert res.usage.prompt_tokens > 0
    total = sum(r.usage.prompt_tokens for r in results)
    expected = sum(len(t.split()) for ts in texts for t in ts)
    assert total == expected  # the shares add up to what the provider counted


@pytest.mark.parametrize(
    ("control", "expected", "calls"),
    [
        # a 400 may be one member's input: the merged call is split, each caller asks alone
        ({"x-emulator-status": "400"}, 400, 1 + 3),
        # the same for every member by construction: shared as it is, never split
        ({"x-emulator-status": "429"}, 429, 1),
        ({"x-emulator-hang": "1"}, 504, 1),
    ],
)
async def test_merged_embeddings_failure_reaches_every_caller(
    make_gateway: Any, emulator: Emulator, control: dict[str, str], expected: int, calls: int
) -> None:
    gw = await make_gateway(
        chain(),
        base=policy(
            FAST_TIMEOUT,
            providers={p: {"retries": {"attempts": 0}} for p in ("openai", "anthropic")},
        ),
        extra_plugins={"seen": Seen},
    )
    key = await gw.create_key("emb", "pro")
    await emulator.reset()
    h = {"Authorization": f"Bearer {key}", **control}
    bodies = [{"model": "text-embedding-3-small", "input": [f"text {i}"]} for i in range(3)]
    got = await statuses(gw, "/v1/embeddings", bodies, h)
    assert [status for status, _ in got] == [expected] * 3
    assert (await emulator.stats())["requests"] == calls


async def test_a_full_batch_goes_at_once_and_the_next_one_opens(
    make_gateway: Any, emulator: Emulator
) -> None:
    gw = await make_gateway(chain(max_inputs=4), extra_plugins={"seen": Seen})
    key = await gw.create_key("full", "pro")
    await emulator.reset()
    client = gw.openai(key)
    texts = [[f"a {i}", f"b {i}"] for i in range(3)]  # 2 + 2 fill a batch; the third opens one
    results = await asyncio.gather(
        *(client.embeddings.create(model="text-embedding-3-small", input=t) for t in texts)
    )
    assert (await emulator.stats())["requests"] == 2
    for inputs, res in zip(texts, results, strict=True):
        assert [d.index for d in res.data] == list(range(len(inputs)))
        assert res.usage.prompt_tokens == sum(len(t.split()) for t in inputs)


async def test_a_caller_that_left_during_the_window_is_not_sent(
    make_gateway: Any, emulator: Emulator
) -> None:
    """A client that hangs up while its embeddings request waits in a batch is dropped from
    it: its inputs are not sent, and the merged call is made with a present member's call."""
    gw = await make_gateway(chain(window="10s", max_inputs=2), extra_plugins={"seen": Seen})
    key = await gw.create_key("gone", "pro")
    await emulator.reset()
    batcher = gw.gateway.runtime.chain.plugins[-1].batcher
    h = {"Authorization": f"Bearer {key}"}

    async def embed(text: str) -> Any:
        body = {"model": "text-embedding-3-small", "input": [text]}
        async with gw.http.post(f"{gw.url}/v1/embeddings", json=body, headers=h) as r:
            assert r.status == 200
            return await r.json()

    leaving = asyncio.create_task(embed("gone"))
    await until(lambda: batcher.open, what="the first request waits in a batch")
    (batch,) = batcher.open.values()
    leaving.cancel()  # the client hangs up: the gateway cancels its handler
    await until(lambda: batch.callers[0].future.cancelled(), what="its place given up")
    staying = await embed("stay")  # the second input fills the batch: it goes at once
    assert len(staying["data"]) == 1
    assert (await emulator.stats())["requests"] == 1
    assert (await emulator.last())["body"]["input"] == ["stay"]
