"""The flight lock at 0 ms provider latency: identical requests spread over three instances
make exactly one provider call, however early the answer comes back. Real redis-server, three
in-process gateways, the emulator's counter; no gate holds the leader, so any window between
"the answer is there" and "the answer is stored" shows as a second call. Then the store's
claim/release/await_flight on their own, each ordering that used to leak a second call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from plugins.cache.store import CacheStore
from tests.conftest import Emulator, Gw, policy

KEY = "f" * 64
ROUNDS = 5
PER_ROUND = 30


@pytest.fixture
async def trio(make_gateway: Any, redis_url: str) -> list[Gw]:
    base = policy(state={"url": redis_url})
    chain = [
        {"name": "auth"},
        {"name": "cache", "config": {"backend": "state", "key": KEY, "default_ttl": "1h"}},
        {"name": "batching"},
    ]
    return [await make_gateway(chain, base=base) for _ in range(3)]


async def ask(client: openai.AsyncOpenAI, prompt: str, stream: bool) -> tuple[str, str]:
    messages: Any = [{"role": "user", "content": prompt}]
    if not stream:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-5.4-mini", messages=messages
        )
        return raw.headers["x-tollway-cache"], raw.parse().choices[0].message.content or ""
    raw_stream = await client.chat.completions.with_raw_response.create(
        model="gpt-5.4-mini", messages=messages, stream=True
    )
    text = ""
    async for chunk in raw_stream.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    return raw_stream.headers["x-tollway-cache"], text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_one_provider_call_at_zero_latency(
    trio: list[Gw], emulator: Emulator, stream: bool
) -> None:
    key = await trio[0].create_key("ann")  # keys live in Redis: every instance knows it
    clients = [gw.openai(key) for gw in trio]
    for n in range(ROUNDS):
        await emulator.reset()
        prompt = f"round {n}: one provider call for every instance ({stream=})"
        answers = await asyncio.gather(
            *(ask(clients[i % 3], prompt, stream) for i in range(PER_ROUND))
        )
        assert (await emulator.stats())["requests"] == 1, f"round {n}"
        assert len({text for _, text in answers}) == 1 and answers[0][1]


# ---- the store's flight, instance by instance --------------------------------------------


@pytest.fixture
async def stores(redis_url: str) -> AsyncIterator[tuple[CacheStore, CacheStore]]:
    """Two instances' stores on one Redis."""
    pair = tuple(CacheStore(url=redis_url, keys=[("k", bytes.fromhex(KEY))]) for _ in "12")
    yield pair  # type: ignore[misc]
    for s in pair:
        await s.close()


async def test_claim_after_the_store_finds_the_answer(
    stores: tuple[CacheStore, CacheStore],
) -> None:
    """B's lookup misses, then A stores and releases, then B claims: B gets A's answer
    from the claim itself instead of a free lock (the second provider call it used to be)."""
    a, b = stores
    assert await b.get("q") is None
    assert await a.claim("q", 5) == ("lead", None)
    await a.set("q", b"answer", 60)
    await a.release("q", b"answer")
    assert await b.claim("q", 5) == ("stored", b"answer")
    assert not await b.backend.in_flight("q")  # nothing claimed


async def test_twins_here_wait_for_the_stored_answer(
    stores: tuple[CacheStore, CacheStore],
) -> None:
    """Twins on the leader's instance wait in process (no round trip), on the other instance
    one watcher polls for all of them; everyone gets the answer once it is stored, even
    when the provider call itself ended long before."""
    a, b = stores
    assert await a.claim("q", 5) == ("lead", None)
    assert [await a.claim("q", 5) for _ in "12"] == [("wait", None)] * 2
    assert [await b.claim("q", 5) for _ in "123"] == [("wait", None)] * 3
    waiting = asyncio.gather(*(s.await_flight("q", 5) for s in (a, a, b, b, b)))
    await asyncio.sleep(0.05)
    assert len(b._watchers) == 1
    await a.set("q", b"answer", 60)
    await a.release("q", b"answer")
    assert await waiting == [b"answer"] * 5
    assert (a.stats.coalesced, b.stats.coalesced) == (0, 3)  # counts the other instance's


async def test_a_leader_without_answer_lets_every_twin_ask(
    stores: tuple[CacheStore, CacheStore],
) -> None:
    a, b = stores
    assert await a.claim("q", 5) == ("lead", None)
    assert await a.claim("q", 5) == ("wait", None) and await b.claim("q", 5) == ("wait", None)
    waiting = asyncio.gather(a.await_flight("q", 5), b.await_flight("q", 5))
    await asyncio.sleep(0.02)
    await a.release("q")  # failed or not to be stored
    assert await waiting == [None, None]
    assert await b.claim("q", 5) == ("lead", None)  # the next one leads


async def test_release_drops_only_its_own_lock(stores: tuple[CacheStore, CacheStore]) -> None:
    """A leader that outlived its lock's TTL must not drop the next leader's lock."""
    a, b = stores
    assert await a.claim("q", 0.05) == ("lead", None)
    await asyncio.sleep(0.1)
    assert await b.claim("q", 5) == ("lead", None)
    await a.release("q")
    assert await b.backend.in_flight("q")


async def test_a_cancelled_claim_does_not_strand_its_twins(
    stores: tuple[CacheStore, CacheStore],
) -> None:
    a, _ = stores
    claiming = asyncio.create_task(a.claim("q", 5))
    await asyncio.sleep(0)  # its future is registered, the round trip not back yet
    assert await a.claim("q", 5) == ("wait", None)
    twin = asyncio.create_task(a.await_flight("q", 5))
    claiming.cancel()
    assert await asyncio.wait_for(twin, 1) is None  # it asks for itself at once
