"""batching: coalescing identical in-flight requests and merging embeddings requests."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from proxy.context import RequestContext
from proxy.hookspecs import hookimpl
from tests.conftest import Emulator, Gw, policy
from tests.procs import until

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


async def test_ten_identical_requests_make_one_call(
    batched: tuple[Gw, str], emulator: Emulator
) -> None:
    gw, key = batched
    client = gw.openai(key)
    replies = await asyncio.gather(
        *(
            client.chat.completions.create(
                model="gpt-5.4-mini",
                messages=MSG,  # type: ignore[arg-type]
                extra_headers={"x-emulator-latency-ms": "200"},
            )
            for _ in range(10)
        )
    )
    assert (await emulator.stats())["requests"] == 1
    texts = {r.choices[0].message.content for r in replies}
    assert len(texts) == 1 and "tell me the same thing" in texts.pop()  # type: ignore[operator]
    assert sorted(s for _, _, s in Seen.rows if s) == ["coalesced"] * 9
    assert len({rid for rid, _, _ in Seen.rows}) == 10


async def test_ten_identical_streams_make_one_call(
    batched: tuple[Gw, str], emulator: Emulator
) -> None:
    gw, key = batched
    client = gw.openai(key)

    async def one() -> str:
        stream = await client.chat.completions.create(
            model="gpt-5.4-mini",
            messages=MSG,
            stream=True,  # type: ignore[arg-type]
            extra_headers={"x-emulator-chunk-delay-ms": "20", "x-emulator-latency-ms": "100"},
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    texts = await asyncio.gather(*(one() for _ in range(10)))
    assert (await emulator.stats())["requests"] == 1
    assert len(set(texts)) == 1 and "tell me the same thing" in texts[0]


async def test_follower_disconnect_does_not_cancel(
    batched: tuple[Gw, str], emulator: Emulator
) -> None:
    gw, key = batched
    body = {"model": "gpt-5.4-mini", "messages": MSG, "stream": True}
    headers = {
        "Authorization": f"Bearer {key}",
        "x-emulator-words": "40",
        "x-emulator-chunk-delay-ms": "15",
    }

    async def full() -> bytes:
        async with gw.http.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers) as r:
            return await r.read()

    keepers = [asyncio.create_task(full()) for _ in range(2)]
    await until(emulator.in_flight, what="the keepers' call in flight")
    async with aiohttp.ClientSession() as s:
        quitter = await s.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers)
        await quitter.content.readuntil(b"\n\n")
        quitter.close()
    results = await asyncio.gather(*keepers)
    assert all(r.rstrip().endswith(b"data: [DONE]") for r in results)
    assert results[0] == results[1]
    assert (await emulator.stats())["requests"] == 1


async def test_error_reaches_every_follower(make_gateway: Any, emulator: Emulator) -> None:
    # a 400 is not retried: one failed call, shared by all five
    gw = await make_gateway(chain(), extra_plugins={"seen": Seen})
    key = await gw.create_key("err", "pro")
    await emulator.reset()
    h = {
        "Authorization": f"Bearer {key}",
        "x-emulator-status": "400",
        "x-emulator-latency-ms": "100",
    }

    async def one() -> int:
        async with gw.http.post(
            f"{gw.url}/v1/chat/completions",
            json={"model": "gpt-5.4-mini", "messages": MSG},
            headers=h,
        ) as r:
            assert (await r.json())["error"]["message"]
            return r.status

    assert await asyncio.gather(*(one() for _ in range(5))) == [400] * 5
    assert (await emulator.stats())["requests"] == 1


async def test_users_do_not_share_calls_by_default(make_gateway: Any, emulator: Emulator) -> None:
    gw = await make_gateway(chain(), extra_plugins={"seen": Seen})
    a, b = await gw.create_key("ua", "pro"), await gw.create_key("ub", "pro")
    await emulator.reset()
    await asyncio.gather(
        *(
            gw.openai(k).chat.completions.create(
                model="gpt-5.4-mini",
                messages=MSG,  # type: ignore[arg-type]
                extra_headers={"x-emulator-latency-ms": "150"},
            )
            for k in (a, b)
        )
    )
    assert (await emulator.stats())["requests"] == 2


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


async def test_first_client_leaving_does_not_strand_duplicates(
    batched: tuple[Gw, str], emulator: Emulator
) -> None:
    gw, key = batched
    body = {"model": "gpt-5.4-mini", "messages": MSG}
    headers = {"Authorization": f"Bearer {key}", "x-emulator-latency-ms": "300"}

    async def patient() -> int:
        async with gw.http.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers) as r:
            assert "tell me the same thing" in (await r.json())["choices"][0]["message"]["content"]
            return r.status

    async with aiohttp.ClientSession() as s:
        leader = asyncio.create_task(
            s.post(
                f"{gw.url}/v1/chat/completions",
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=0.1),
            )
        )
        await until(emulator.in_flight, what="the first call in flight")
        others = [asyncio.create_task(patient()) for _ in range(2)]
        with pytest.raises(asyncio.TimeoutError):
            await leader
    assert await asyncio.gather(*others) == [200, 200]
    # the first call died with its client; one duplicate led the second, the other shared it
    assert (await emulator.stats())["requests"] == 2
    assert sorted(s for _, _, s in Seen.rows if s) == ["coalesced"]


FAST_TIMEOUT = policy(providers={"openai": {"timeout": {"read": "300ms"}}})


async def _statuses(gw: Gw, path: str, bodies: list[Any], headers: dict[str, str]) -> list[Any]:
    """Send the bodies at once; (status, error code) of each reply, in order."""

    async def one(body: Any) -> Any:
        async with gw.http.post(f"{gw.url}{path}", json=body, headers=headers) as r:
            return r.status, (await r.json())["error"]["code"]

    return await asyncio.gather(*(one(b) for b in bodies))


async def test_transport_failure_reaches_every_follower(
    make_gateway: Any, emulator: Emulator
) -> None:
    """Not an error reply but an exception (a read timeout): every duplicate gets it too."""
    assert FAST_TIMEOUT != policy()
    gw = await make_gateway(chain(), base=FAST_TIMEOUT, extra_plugins={"seen": Seen})
    key = await gw.create_key("hang", "pro")
    await emulator.reset()
    h = {"Authorization": f"Bearer {key}", "x-emulator-hang": "1"}
    body = {"model": "gpt-5.4-mini", "messages": MSG}
    got = await _statuses(gw, "/v1/chat/completions", [body] * 5, h)
    assert got == [(504, "upstream_timeout")] * 5
    assert (await emulator.stats())["requests"] == 1  # a read timeout is never retried


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
    got = await _statuses(gw, "/v1/embeddings", bodies, h)
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
