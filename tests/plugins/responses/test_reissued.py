"""A /v1/responses reply made for another request (a cache hit, a coalesced follower) goes out
under a response id of its own, which the gateway keeps: with a cache or a shared call across
a tier, two users never hold one id, and each retrieves and continues their own."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import openai
import pytest

from tests.conftest import Emulator, Gw
from tests.plugins.responses.test_responses import BASE, SECRET, user_texts

PROMPT = f"Remember this: {SECRET}"
GATEWAY_ID = re.compile(r"resp_[0-9a-f]{48}")
MODELS = ["claude-sonnet", "gpt-5.4-mini"]  # translated (gateway-kept), native (provider-kept)


def cached_chain(scope: str = "tier") -> list[dict[str, Any]]:
    return [
        {"name": "auth"},
        {"name": "responses"},
        {"name": "cache", "config": {"default_ttl": 60, "scope": scope}},
    ]


async def users(
    make_gateway: Callable[..., Any], emulator: Emulator, chain: list[dict[str, Any]]
) -> tuple[openai.AsyncOpenAI, openai.AsyncOpenAI]:
    """A gateway with ``chain`` and two users of the same tier (pro); the emulator's counts
    start from zero."""
    gw: Gw = await make_gateway(chain, base=BASE)
    await emulator.reset()
    return gw.openai(await gw.create_key("alice")), gw.openai(await gw.create_key("bob"))


async def continue_own(
    client: openai.AsyncOpenAI, model: str, rid: str, emulator: Emulator
) -> None:
    """``rid`` continues for its owner: the reply names it, and the provider got the earlier
    turn (expanded, or through the provider's own thread for a native id)."""
    follow = await client.responses.create(
        model=model,
        input="What did I ask you to remember?",
        previous_response_id=rid,
        extra_headers={"Cache-Control": "no-cache"},  # to the provider, whatever is cached
    )
    assert follow.previous_response_id == rid
    sent = (await emulator.last())["body"]
    assert SECRET in user_texts(sent) or sent.get("previous_response_id") == rid


Asked = tuple[str, openai.AsyncOpenAI, openai.AsyncOpenAI, Any]


@pytest.fixture(params=MODELS)
async def asked(
    request: pytest.FixtureRequest, make_gateway: Callable[..., Any], emulator: Emulator
) -> Asked:
    """(model, alice, bob, alice's first answer): two users sharing a cache by tier, and the
    answer that filled it."""
    model: str = request.param
    alice, bob = await users(make_gateway, emulator, cached_chain())
    return model, alice, bob, await alice.responses.create(model=model, input=PROMPT)


async def test_a_hit_shared_by_a_tier_gets_an_id_per_request(
    asked: Asked, emulator: Emulator
) -> None:
    model, alice, bob, first = asked
    raw = await bob.responses.with_raw_response.create(model=model, input=PROMPT)
    assert raw.headers["X-Tollway-Cache"] == "hit"
    bobs = raw.parse()
    again = await alice.responses.with_raw_response.create(model=model, input=PROMPT)
    assert again.headers["X-Tollway-Cache"] == "hit"
    alices_second = again.parse()
    assert len({first.id, bobs.id, alices_second.id}) == 3  # one user's two answers too
    assert GATEWAY_ID.fullmatch(bobs.id) and GATEWAY_ID.fullmatch(alices_second.id)
    assert bobs.output_text == first.output_text == alices_second.output_text
    assert (await emulator.stats())["requests"] == 1
    # each retrieves their own, and another's id is unknown to them
    for client, rid in ((alice, first.id), (bob, bobs.id), (alice, alices_second.id)):
        got = await client.responses.retrieve(rid)
        assert got.id == rid and got.output_text == first.output_text
    with pytest.raises(openai.NotFoundError):
        await alice.responses.retrieve(bobs.id)
    with pytest.raises(openai.NotFoundError):
        await bob.responses.retrieve(first.id)
    # and each continues their own
    await continue_own(bob, model, bobs.id, emulator)
    await continue_own(alice, model, first.id, emulator)
    await continue_own(alice, model, alices_second.id, emulator)


async def test_a_streamed_hit_carries_its_own_id_in_every_event(
    asked: Asked, emulator: Emulator
) -> None:
    model, _, bob, first = asked
    ids: set[str] = set()
    final: Any = None
    async with bob.responses.stream(model=model, input=PROMPT) as stream:
        async for event in stream:
            response = getattr(event, "response", None)
            if response is not None:
                ids.add(response.id)
        final = await stream.get_final_response()
    assert len(ids) == 1 and final.id in ids and final.id != first.id
    assert GATEWAY_ID.fullmatch(final.id)
    assert final.output_text == first.output_text
    assert (await emulator.stats())["requests"] == 1
    assert (await bob.responses.retrieve(final.id)).output_text == first.output_text
    await continue_own(bob, model, final.id, emulator)


async def test_a_hit_continuing_a_conversation_names_its_own_previous_id(
    make_gateway: Callable[..., Any], emulator: Emulator
) -> None:
    """Two users whose expanded conversations are the same share a cached answer; each reply
    names the id its own request continued, never the other user's."""
    alice, bob = await users(make_gateway, emulator, cached_chain())
    a1 = await alice.responses.create(model="claude-sonnet", input=PROMPT)
    b1 = await bob.responses.create(model="claude-sonnet", input=PROMPT)  # a hit
    a2 = await alice.responses.create(
        model="claude-sonnet", input="And?", previous_response_id=a1.id
    )
    hit = await bob.responses.with_raw_response.create(
        model="claude-sonnet", input="And?", previous_response_id=b1.id
    )
    assert hit.headers["X-Tollway-Cache"] == "hit"
    b2 = hit.parse()
    assert a2.previous_response_id == a1.id and b2.previous_response_id == b1.id
    assert b2.id != a2.id
    assert (await bob.responses.retrieve(b2.id)).previous_response_id == b1.id


@pytest.mark.parametrize("stream", [False, True])
async def test_a_coalesced_follower_of_a_native_call_gets_its_own_id(
    make_gateway: Callable[..., Any], emulator: Emulator, stream: bool
) -> None:
    chain = [
        {"name": "auth"},
        {"name": "responses"},
        {"name": "batching", "config": {"scope": "tier"}},
    ]
    alice, bob = await users(make_gateway, emulator, chain)
    slow = {"x-emulator-latency-ms": "400", "x-emulator-chunk-delay-ms": "5"}

    async def ask(client: openai.AsyncOpenAI) -> Any:
        if not stream:
            return await client.responses.create(
                model="gpt-5.4-mini", input=PROMPT, extra_headers=slow
            )
        ids: set[str] = set()
        async with client.responses.stream(
            model="gpt-5.4-mini", input=PROMPT, extra_headers=slow
        ) as s:
            async for event in s:
                response = getattr(event, "response", None)
                if response is not None:
                    ids.add(response.id)
            final = await s.get_final_response()
        assert ids == {final.id}  # one id in every event of a stream
        return final

    a, b = await asyncio.gather(ask(alice), ask(bob))
    assert (await emulator.stats())["requests"] == 1  # one provider call shared
    assert a.id != b.id and a.output_text == b.output_text
    # the leader has the provider's id, the follower one the gateway made
    assert sum(bool(GATEWAY_ID.fullmatch(r.id)) for r in (a, b)) == 1
    assert (await alice.responses.retrieve(a.id)).output_text == a.output_text
    assert (await bob.responses.retrieve(b.id)).output_text == b.output_text
    await continue_own(alice, "gpt-5.4-mini", a.id, emulator)
    await continue_own(bob, "gpt-5.4-mini", b.id, emulator)
