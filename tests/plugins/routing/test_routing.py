"""routing: ``model: auto`` by complexity, and fallbacks when a provider fails."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import openai
import pytest

from plugins.routing import AutoConfig, Scorer
from proxy.context import RequestContext
from proxy.hookspecs import hookimpl
from tests.conftest import Emulator, Gw, config_error


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


POLICY = """
version: 1
admin: {{key: {admin}}}
state: {{dir: null}}
providers:
  openai: {{kind: openai, base_url: "{emu}/v1", api_key: upstream-secret,
           retries: {{attempts: 1, backoff: 10ms}}, timeout: {{connect: 2s, read: 5s}}}}
  anthropic: {{kind: anthropic, base_url: "{emu}", api_key: upstream-secret,
              retries: {{attempts: 1, backoff: 10ms}}, timeout: {{connect: 2s, read: 5s}}}}
  impatient: {{kind: openai, base_url: "{emu}/v1", api_key: upstream-secret,
              retries: {{attempts: 0}}, timeout: {{connect: 2s, read: 300ms}}}}
  dedicated: {{kind: anthropic, base_url: "{emu}", api_key: upstream-secret}}
  down: {{kind: openai, base_url: "http://127.0.0.1:CLOSED/v1", api_key: x,
         retries: {{attempts: 0}}, timeout: {{connect: 1s, read: 1s}}}}
models:
  gpt-5.4-mini: {{provider: openai, input_per_mtok: 0.25, output_per_mtok: 2.0}}
  gpt-5.5: {{provider: openai, dedicated_provider: dedicated, input_per_mtok: 1.25,
            output_per_mtok: 10.0}}
  claude-sonnet: {{provider: anthropic, upstream_model: claude-sonnet-5, input_per_mtok: 3,
                  output_per_mtok: 15}}
  broken: {{provider: openai, upstream_model: emu-status-503, input_per_mtok: 1}}
  overloaded: {{provider: anthropic, upstream_model: emu-status-529, input_per_mtok: 1}}
  bad-request: {{provider: openai, upstream_model: emu-status-400, input_per_mtok: 1}}
  slow: {{provider: impatient, upstream_model: emu-slow-3000, input_per_mtok: 1}}
  unreachable: {{provider: down, input_per_mtok: 1}}
  text-embedding-3-small: {{provider: openai, input_per_mtok: 0.02}}
features:
  basic_suggestions: {{price_per_request: 0.01}}
tiers:
  free: {{requests_per_minute: 1000, features: [basic_suggestions],
         models: [gpt-5.4-mini, broken]}}
  pro: {{includes: free, requests_per_minute: 1000}}
  vip: {{includes: pro, requests_per_minute: 1000, perks: [dedicated_instances]}}
""".replace("CLOSED", str(_closed_port()))

ROUTING = """
  - name: routing
    config:
      auto: {cheap: gpt-5.4-mini, strong: STRONG}
      fallbacks:
        broken: [claude-sonnet, gpt-5.4-mini]
        overloaded: [gpt-5.5]
        bad-request: [gpt-5.4-mini]
        slow: [gpt-5.4-mini]
        unreachable: [gpt-5.5]
        gpt-5.5: [broken]
"""

COMPLEX = (
    "Refactor this function and explain why it is slow:\n"
    "```python\ndef total(xs):\n    s = 0\n    for x in xs:\n        s = s + x\n    return s\n```"
)


class Seen:
    rows: list[tuple[str, str | None, int, int, int]] = []
    providers: list[str | None] = []

    def __init__(self, config: Any, policy: Any) -> None:
        pass

    @hookimpl
    async def log(self, ctx: RequestContext) -> None:
        Seen.providers.append(ctx.route.provider if ctx.route else None)
        Seen.rows.append(
            (
                ctx.model,
                ctx.route.model if ctx.route else None,
                ctx.status,
                ctx.usage.input_tokens,
                ctx.usage.output_tokens,
            )
        )


async def start(
    make_gateway: Any, emulator: Emulator, *, strong: str = "gpt-5.5", extra: str = ""
) -> Gw:
    Seen.rows = []
    chain = "chain:\n  - name: auth\n  - name: limits\n    config: {}\n"
    chain += ROUTING.replace("STRONG", strong) + extra + "  - name: seen\n"
    gw = await make_gateway(chain, base=POLICY, extra_plugins={"seen": Seen})
    await emulator.reset()
    return gw


# ---- model: auto --------------------------------------------------------------------------


def test_scorer_points() -> None:
    s = Scorer(AutoConfig(cheap="a", strong="b"))
    assert s.score({"messages": [{"role": "user", "content": "hi"}]}) == (0, [])
    long = "word " * 1000  # ~1250 estimated tokens: one point; 2500 would be two
    assert s.score({"messages": [{"role": "user", "content": long}]}) == (1, ["prompt"])
    assert s.score({"messages": [{"role": "user", "content": long * 3}]})[0] == 2
    assert s.score({"prompt": "x = 1\ny = 2\nreturn x"}) == (1, ["code"])
    assert s.score({"messages": [{"role": "user", "content": "Prove it step by step"}]}) == (
        1,
        ["reasoning"],
    )
    # reasoning words count in what the user wrote, not in the system prompt
    system = {"system": "reason carefully", "messages": [{"role": "user", "content": "hi"}]}
    assert s.score(system) == (0, [])
    assert s.score({"messages": [], "tools": [{"type": "function"}]}) == (1, ["tools"])
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 3
    assert s.score({"messages": turns}) == (1, ["turns"])
    assert s.score({"messages": [], "max_tokens": 4000}) == (1, ["output"])
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": COMPLEX}]}]}
    assert s.score(parts) == (2, ["code", "reasoning"])


async def test_auto_picks_cheap_or_strong(make_gateway: Any, emulator: Emulator) -> None:
    gw = await start(make_gateway, emulator)
    client = gw.openai(await gw.create_key("ann", "pro"))
    simple = await client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "say hello"}]
    )
    assert simple.headers["x-tollway-model"] == "gpt-5.4-mini"
    assert simple.headers["x-tollway-route"] == "cheap; score=0; -"
    assert (await emulator.last())["body"]["model"] == "gpt-5.4-mini"
    hard = await client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": COMPLEX}]
    )
    assert hard.headers["x-tollway-model"] == "gpt-5.5"
    assert hard.headers["x-tollway-route"] == "strong; score=2; code,reasoning"
    assert (await emulator.last())["body"]["model"] == "gpt-5.5"
    assert hard.parse().choices[0].message.content
    # a named model is never rerouted, and gets no route header
    named = await client.chat.completions.with_raw_response.create(
        model="gpt-5.4-mini", messages=[{"role": "user", "content": COMPLEX}]
    )
    assert named.headers["x-tollway-model"] == "gpt-5.4-mini"
    assert "x-tollway-route" not in named.headers
    assert [(m, r) for m, r, *_ in Seen.rows] == [
        ("auto", "gpt-5.4-mini"),
        ("auto", "gpt-5.5"),
        ("gpt-5.4-mini", "gpt-5.4-mini"),
    ]
    listed = {m.id: m.owned_by for m in (await client.models.list()).data}
    assert listed["auto"] == "tollway" and listed["gpt-5.5"] == "openai"
    async with gw.http.get(f"{gw.url}/metrics") as r:
        text = await r.text()
    assert 'tollway_auto_routed_total{choice="cheap"} 1.0' in text
    assert 'tollway_auto_routed_total{choice="strong"} 1.0' in text


async def test_auto_across_dialects_and_streams(make_gateway: Any, emulator: Emulator) -> None:
    """The strong model on an Anthropic provider: an OpenAI client's complex request is
    translated, and an Anthropic client's simple one goes to the OpenAI model."""
    gw = await start(make_gateway, emulator, strong="claude-sonnet")
    key = await gw.create_key("ann", "pro")
    stream = await gw.openai(key).chat.completions.create(
        model="auto", messages=[{"role": "user", "content": COMPLEX}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text and (await emulator.last())["body"]["model"] == "claude-sonnet-5"
    msg = await gw.anthropic(key).messages.with_raw_response.create(
        model="auto", max_tokens=50, messages=[{"role": "user", "content": "say hello"}]
    )
    assert msg.headers["x-tollway-model"] == "gpt-5.4-mini"
    assert (await msg.parse()).content[0].text  # type: ignore[union-attr]
    assert (await emulator.last())["path"] == "/v1/chat/completions"


async def test_auto_stays_inside_the_plan(make_gateway: Any, emulator: Emulator) -> None:
    gw = await start(make_gateway, emulator)
    free = gw.openai(await gw.create_key("fay", "free"))
    hard = await free.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": COMPLEX}]
    )
    assert hard.headers["x-tollway-model"] == "gpt-5.4-mini"  # gpt-5.5 is not in plan free
    assert hard.headers["x-tollway-route"] == "cheap; score=2; code,reasoning"


async def test_dedicated_instances_perk(make_gateway: Any, emulator: Emulator) -> None:
    """A plan with dedicated_instances is served by the model's dedicated provider (here an
    Anthropic-kind one, so the emulator's path shows it); other plans by the shared one."""
    gw = await start(make_gateway, emulator)
    for tier, path, provider in (
        ("vip", "/v1/messages", "dedicated"),
        ("pro", "/v1/chat/completions", "openai"),
    ):
        client = gw.openai(await gw.create_key(f"{tier}-user", tier))
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-5.5", messages=[{"role": "user", "content": "hello"}]
        )
        assert raw.headers["x-tollway-model"] == "gpt-5.5"
        assert (await emulator.last())["path"] == path
        assert gw.gateway.runtime.routes["gpt-5.5"].provider == "openai"
        assert Seen.providers[-1] == provider


async def test_auto_is_not_for_embeddings(make_gateway: Any, emulator: Emulator) -> None:
    gw = await start(make_gateway, emulator)
    client = gw.openai(await gw.create_key("ann", "pro"))
    with pytest.raises(openai.BadRequestError) as info:
        await client.embeddings.create(model="auto", input="x")
    assert info.value.code == "invalid_model"
    assert (await emulator.stats())["requests"] == 0


# ---- fallbacks ----------------------------------------------------------------------------


async def test_fallback_to_another_provider(make_gateway: Any, emulator: Emulator) -> None:
    """503 from the first provider (after its retry): the request is sent to claude-sonnet in
    the Anthropic dialect and comes back as a chat.completion, priced as claude-sonnet."""
    gw = await start(make_gateway, emulator)
    client = gw.openai(await gw.create_key("ann", "pro"))
    raw = await client.chat.completions.with_raw_response.create(
        model="broken", messages=[{"role": "user", "content": "fall back please"}]
    )
    reply = raw.parse()
    assert raw.headers["x-tollway-model"] == "claude-sonnet"
    assert reply.object == "chat.completion" and "fall back please" in (
        reply.choices[0].message.content or ""
    )
    last = await emulator.last()
    assert last["path"] == "/v1/messages" and last["body"]["model"] == "claude-sonnet-5"
    assert (await emulator.stats())["requests"] == 3  # 503, its retry, then claude
    model, route, status, inp, out = Seen.rows[-1]
    assert (model, route, status) == ("broken", "claude-sonnet", 200)
    assert inp == reply.usage.prompt_tokens and out == reply.usage.completion_tokens  # type: ignore[union-attr]
    async with gw.http.get(f"{gw.url}/metrics") as r:
        assert "tollway_fallbacks_total 1.0" in await r.text()


async def test_fallback_of_a_stream_and_of_an_anthropic_client(
    make_gateway: Any, emulator: Emulator
) -> None:
    gw = await start(make_gateway, emulator)
    key = await gw.create_key("ann", "pro")
    stream = await gw.openai(key).chat.completions.create(
        model="broken",
        messages=[{"role": "user", "content": "stream it"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert "stream it" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    # 529 (Anthropic overloaded) on an Anthropic client: served by gpt-5.5, translated back
    msg = await gw.anthropic(key).messages.with_raw_response.create(
        model="overloaded", max_tokens=50, messages=[{"role": "user", "content": "hello there"}]
    )
    assert msg.headers["x-tollway-model"] == "gpt-5.5"
    assert "hello there" in (await msg.parse()).content[0].text  # type: ignore[union-attr]


async def test_timeouts_and_unreachable_providers_fall_back(
    make_gateway: Any, emulator: Emulator
) -> None:
    gw = await start(make_gateway, emulator)
    client = gw.openai(await gw.create_key("ann", "pro"))
    for model, served in (("slow", "gpt-5.4-mini"), ("unreachable", "gpt-5.5")):
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "are you there"}]
        )
        assert raw.headers["x-tollway-model"] == served
        assert raw.parse().choices[0].message.content


async def test_no_fallback_for_a_client_error(make_gateway: Any, emulator: Emulator) -> None:
    gw = await start(make_gateway, emulator)
    client = gw.openai(await gw.create_key("ann", "pro"))
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model="bad-request", messages=[{"role": "user", "content": "x"}]
        )
    assert (await emulator.stats())["requests"] == 1
    assert Seen.rows[-1][1:3] == ("bad-request", 400)


async def test_every_fallback_failing_returns_the_last_failure(
    make_gateway: Any, emulator: Emulator
) -> None:
    """gpt-5.5 -> broken: the gpt-5.5 call is made to fail by a header, broken fails anyway;
    the client gets the last failure, in its shape, and the route says who failed last."""
    gw = await start(make_gateway, emulator)
    client = gw.openai(await gw.create_key("ann", "pro"), max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(
            model="gpt-5.5",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-emulator-status": "500"},
        )
    assert info.value.status_code in (500, 503)
    assert info.value.response.headers["x-tollway-model"] == "broken"
    assert (await emulator.stats())["requests"] == 4  # gpt-5.5 and broken, each retried once
    assert Seen.rows[-1][1] == "broken"


async def test_fallbacks_outside_the_plan_are_skipped(
    make_gateway: Any, emulator: Emulator
) -> None:
    gw = await start(make_gateway, emulator)
    free = gw.openai(await gw.create_key("fay", "free"))
    raw = await free.chat.completions.with_raw_response.create(
        model="broken", messages=[{"role": "user", "content": "x"}]
    )
    assert raw.headers["x-tollway-model"] == "gpt-5.4-mini"  # claude-sonnet is not in plan free
    assert (await emulator.stats())["requests"] == 3


async def test_a_fallback_takes_one_admission_slot(make_gateway: Any, emulator: Emulator) -> None:
    """upstream_request runs again for the fallback's request: limits must not take a second
    place in the admission queue (with one place and no queue, a leak would refuse the next)."""
    Seen.rows = []
    chain = "chain:\n  - name: auth\n  - name: limits\n"
    chain += "    config: {global: {concurrent_requests: 1, queue_max_size: 0}}\n"
    chain += ROUTING.replace("STRONG", "gpt-5.5") + "  - name: seen\n"
    gw = await make_gateway(chain, base=POLICY, extra_plugins={"seen": Seen})
    client = gw.openai(await gw.create_key("ann", "pro"), max_retries=0)
    for _ in range(3):
        raw = await client.chat.completions.with_raw_response.create(
            model="broken", messages=[{"role": "user", "content": "x"}]
        )
        assert raw.headers["x-tollway-model"] == "claude-sonnet"


async def test_coalesced_duplicates_get_the_fallbacks_answer(
    make_gateway: Any, emulator: Emulator
) -> None:
    """Identical requests share the leader's call; when it fell back to an Anthropic model,
    every duplicate's reply is translated from that model's dialect, whole and streamed."""
    gw = await start(
        make_gateway, emulator, extra="  - name: batching\n    config: {window: 50ms}\n"
    )
    client = gw.openai(await gw.create_key("ann", "pro"))
    hdr = {"x-emulator-latency-ms": "150"}
    msgs = [{"role": "user", "content": "one answer for all"}]

    async def whole() -> tuple[str, str]:
        raw = await client.chat.completions.with_raw_response.create(
            model="broken",
            messages=msgs,
            extra_headers=hdr,  # type: ignore[arg-type]
        )
        return raw.headers["x-tollway-model"], raw.parse().choices[0].message.content or ""

    got = await asyncio.gather(*(whole() for _ in range(5)))
    assert {m for m, _ in got} == {"claude-sonnet"}
    assert len({t for _, t in got}) == 1 and "one answer for all" in got[0][1]
    assert (await emulator.stats())["requests"] == 3

    async def streamed() -> str:
        s = await client.chat.completions.create(
            model="broken",
            messages=msgs,
            stream=True,
            extra_headers=hdr,  # type: ignore[arg-type]
        )
        return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])

    await emulator.reset()
    texts = await asyncio.gather(*(streamed() for _ in range(4)))
    assert len(set(texts)) == 1 and "one answer for all" in texts[0]
    assert (await emulator.stats())["requests"] == 3
    assert {r for _, r, *_ in Seen.rows} == {"claude-sonnet"}


async def test_a_fallbacks_answer_is_cached_under_the_model_that_gave_it(
    make_gateway: Any, emulator: Emulator
) -> None:
    gw = await start(
        make_gateway, emulator, extra="  - name: cache\n    config: {default_ttl: 1h}\n"
    )
    client = gw.openai(await gw.create_key("ann", "pro"))
    msgs = [{"role": "user", "content": "cache the fallback"}]
    first = await client.chat.completions.with_raw_response.create(
        model="broken",
        messages=msgs,  # type: ignore[arg-type]
    )
    assert first.headers["x-tollway-model"] == "claude-sonnet"
    assert first.headers["x-tollway-cache"] == "miss"
    direct = await client.chat.completions.with_raw_response.create(
        model="claude-sonnet",
        messages=msgs,  # type: ignore[arg-type]
    )
    assert direct.headers["x-tollway-cache"] == "hit"
    assert direct.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert (await emulator.stats())["requests"] == 3  # the hit called nobody


# ---- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ("{auto: {cheap: nope, strong: gpt-5.5}}", "auto.cheap: unknown model 'nope'"),
        ("{auto: {name: gpt-5.5, cheap: gpt-5.4-mini, strong: gpt-5.5}}", "auto.name"),
        ("{fallbacks: {gpt-5.5: [gpt-5.5]}}", "cannot be its own fallback"),
        ("{fallbacks: {gpt-5.5: [nope]}}", "fallbacks.gpt-5.5: unknown model 'nope'"),
        ("{auto: {cheap: gpt-5.4-mini, strong: gpt-5.5, strong_at: 0}}", "strong_at"),
    ],
)
def test_bad_config_is_refused(config: str, error: str) -> None:
    message = config_error("routing", config, base=POLICY)
    assert message.startswith("chain[0] (routing).config") and error in message
