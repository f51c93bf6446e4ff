"""batching, coalescing: identical in-flight requests share one provider call."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.conftest import Emulator, Gw, policy
from tests.plugins.batching.conftest import FAST_TIMEOUT, MSG, Seen, chain, statuses
from tests.procs import until


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
    got = await statuses(gw, "/v1/chat/completions", [body] * 5, h)
    assert got == [(504, "upstream_timeout")] * 5
    assert (await emulator.stats())["requests"] == 1  # a read timeout is never retried
