"""Issue 11, item 5: a shared provider call never mixes tenants, headers or failures.

Batching merges small embeddings requests of one window into one provider call, and coalescing
lets identical requests share one. Both must keep each caller's request its own: only requests
with identical forwarded headers (and, unless the policy widens ``scope``, of one user) share a
call, and one member's bad input never fails another member's request.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest

from proxy.context import RequestContext, UpstreamRequest
from proxy.hookspecs import hookimpl
from tests.conftest import Emulator, Gw

EMB = "text-embedding-3-small"


def chain(scope: str = "user", extra: str = "") -> str:
    # a window wide enough that requests sent together land in it on a busy 2-core machine
    return (
        f"chain:\n  - name: auth\n{extra}  - name: batching\n"
        f"    config: {{window: 500ms, max_inputs: 64, scope: {scope}}}\n"
    )


class Project:
    """Sets a per-user provider-account header on the outgoing request, the way an operator's
    plugin would: the upstream request, not the client's, decides what may be merged."""

    def __init__(self, config: Any, policy: Any) -> None:
        pass

    @hookimpl
    async def upstream_request(self, ctx: RequestContext, req: UpstreamRequest) -> None:
        assert ctx.principal is not None
        req.headers["openai-project"] = f"proj_{ctx.principal.user_id}"


async def direct(emulator: Emulator, inputs: list[str]) -> list[list[float]]:
    """The vectors the provider gives for ``inputs`` asked alone (the oracle)."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{emulator.url}/v1/embeddings",
            json={"model": EMB, "input": inputs},
            headers={"Authorization": "Bearer upstream-secret"},
        ) as r,
    ):
        assert r.status == 200
        return [d["embedding"] for d in (await r.json())["data"]]


def assert_vectors(reply: Any, expected: list[list[float]]) -> None:
    got = [d.embedding for d in reply.data]
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, rel=1e-6)


async def embed(client: openai.AsyncOpenAI, inputs: list[str], **kw: Any) -> Any:
    """The SDK's reply, or the exception it raised (so requests sent together all finish)."""
    try:
        return await client.embeddings.create(
            model=EMB, input=inputs, encoding_format="float", **kw
        )
    except openai.APIStatusError as e:
        return e


@pytest.mark.parametrize(
    "bad",
    [[""], ["word " * 9000]],  # an empty input; an input over the model's 8192 tokens
    ids=["empty", "too-long"],
)
async def test_one_tenants_bad_input_fails_only_its_own_request(
    make_gateway: Any, emulator: Emulator, bad: list[str]
) -> None:
    gw: Gw = await make_gateway(chain("global"))  # the policy lets users share batches
    good_client = gw.openai(await gw.create_key("ada", "pro"))
    bad_client = gw.openai(await gw.create_key("mallory", "pro"))
    await emulator.reset()
    good_inputs = ["a perfectly fine text", "another one"]
    good, failed = await asyncio.gather(embed(good_client, good_inputs), embed(bad_client, bad))
    # the two were merged (one call), that call failed, then each was sent alone (two more):
    # without merging there would be two calls, without the split one (and both would fail)
    assert (await emulator.stats())["requests"] == 3
    assert not isinstance(good, Exception), good
    assert_vectors(good, await direct(emulator, good_inputs))
    assert good.usage.prompt_tokens == sum(len(t.split()) for t in good_inputs)
    assert isinstance(failed, openai.BadRequestError)
    body = failed.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert "input" in body["error"]["message"] or "context length" in body["error"]["message"]


async def test_a_header_that_fails_one_request_does_not_fail_the_other(
    make_gateway: Any, emulator: Emulator
) -> None:
    gw: Gw = await make_gateway(chain("global"))
    client = gw.openai(await gw.create_key("ada", "pro"))
    other = gw.openai(await gw.create_key("eve", "pro"))
    await emulator.reset()
    ok, failed = await asyncio.gather(
        embed(client, ["fine"]),
        embed(other, ["also fine"], extra_headers={"x-emulator-status": "400"}),
    )
    # different forwarded headers: two calls, each with its own headers and its own outcome
    assert (await emulator.stats())["requests"] == 2
    assert not isinstance(ok, Exception), ok
    assert_vectors(ok, await direct(emulator, ["fine"]))
    assert isinstance(failed, openai.BadRequestError)
    assert set(failed.response.json()["error"]) == {"message", "type", "param", "code"}


async def test_a_provider_account_header_is_never_applied_to_another_tenants_inputs(
    make_gateway: Any, emulator: Emulator
) -> None:
    gw: Gw = await make_gateway(
        chain("global", extra="  - name: project\n"), extra_plugins={"project": Project}
    )
    ada = gw.openai(await gw.create_key("ada", "pro"))
    eve = gw.openai(await gw.create_key("eve", "pro"))
    await emulator.reset()
    results = await asyncio.gather(embed(ada, ["one"]), embed(ada, ["two"]), embed(eve, ["three"]))
    assert all(not isinstance(r, Exception) for r in results), results
    # ada's two requests carry the same project and merge; eve's carries hers and goes alone
    assert (await emulator.stats())["requests"] == 2
    for r, text in zip(results, ["one", "two", "three"], strict=True):
        assert_vectors(r, await direct(emulator, [text]))
    await emulator.reset()
    await embed(eve, ["four"])
    last = await emulator.last()
    assert last["headers"]["openai-project"] == "proj_eve"  # the header really goes upstream
    assert last["body"]["input"] == ["four"]


async def test_identical_headers_of_one_user_still_merge(
    make_gateway: Any, emulator: Emulator
) -> None:
    gw: Gw = await make_gateway(chain())
    client = gw.openai(await gw.create_key("ada", "pro"))
    await emulator.reset()
    texts = [["one"], ["two", "three"], ["four"]]
    results = await asyncio.gather(*(embed(client, t) for t in texts))
    assert (await emulator.stats())["requests"] == 1
    last = await emulator.last()
    assert sorted(last["body"]["input"]) == sorted(t for ts in texts for t in ts)
    for r, inputs in zip(results, texts, strict=True):
        assert_vectors(r, await direct(emulator, inputs))


async def test_users_do_not_share_a_batch_unless_the_policy_says_so(
    make_gateway: Any, emulator: Emulator
) -> None:
    for scope, calls in (("user", 2), ("global", 1)):
        gw: Gw = await make_gateway(chain(scope))
        a = gw.openai(await gw.create_key("ada", "pro"))
        b = gw.openai(await gw.create_key("bob", "pro"))
        await emulator.reset()
        results = await asyncio.gather(embed(a, ["from ada"]), embed(b, ["from bob"]))
        assert all(not isinstance(r, Exception) for r in results), results
        assert (await emulator.stats())["requests"] == calls, scope


async def test_coalescing_never_shares_an_answer_across_forwarded_headers(
    make_gateway: Any, emulator: Emulator
) -> None:
    gw: Gw = await make_gateway(chain())
    client = gw.openai(await gw.create_key("ada", "pro"))
    await emulator.reset()
    msg = [{"role": "user", "content": "the same question"}]
    slow = {"x-emulator-latency-ms": "300"}

    async def ask(headers: dict[str, str]) -> Any:
        try:
            return await client.chat.completions.create(
                model="gpt-5.4-mini",
                messages=msg,  # type: ignore[arg-type]
                extra_headers=headers,
            )
        except openai.APIStatusError as e:
            return e

    same = await asyncio.gather(ask(slow), ask(slow))
    assert (await emulator.stats())["requests"] == 1  # identical: one shared call
    assert all(not isinstance(r, Exception) for r in same)
    await emulator.reset()
    ok, failed = await asyncio.gather(ask(slow), ask({**slow, "x-emulator-status": "400"}))
    assert (await emulator.stats())["requests"] == 2  # the same body, other headers: no sharing
    assert not isinstance(ok, Exception), ok
    assert "the same question" in (ok.choices[0].message.content or "")
    assert isinstance(failed, openai.BadRequestError)
