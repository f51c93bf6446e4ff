"""The plugin chain: registration checks, order, short-circuit, every phase through HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from pydantic import BaseModel, ConfigDict

from proxy.chain import compile_chain
from proxy.context import (
    Reply,
    RequestContext,
    StashKey,
    StreamEvent,
    UpstreamCall,
    UpstreamRequest,
    UpstreamResponse,
)
from proxy.hookspecs import hookimpl
from proxy.policy import PolicyError, load_text
from tests.conftest import Emulator

CHAT = {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "hello chain"}]}


def recorder(name: str, calls: list[str], *, reply: bool = False) -> type:
    """A throwaway plugin class that records each phase it sees."""

    class Recorder:
        def __init__(self, config: Any, policy: Any) -> None:
            pass

        @hookimpl
        async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
            calls.append(f"{name}.start")
            yield
            calls.append(f"{name}.stop")

        @hookimpl
        async def access(self, ctx: RequestContext) -> Reply | None:
            calls.append(f"{name}.access")
            if reply:
                return Reply(body={"local": name})
            return None

        @hookimpl
        async def upstream_request(self, ctx: RequestContext, req: UpstreamRequest) -> None:
            calls.append(f"{name}.upstream_request")

        @hookimpl
        async def response_headers(self, ctx: RequestContext, headers: dict[str, str]) -> None:
            calls.append(f"{name}.response_headers")

        @hookimpl
        async def log(self, ctx: RequestContext) -> None:
            calls.append(f"{name}.log")

    return Recorder


def policy(chain: str) -> Any:
    return load_text(
        "version: 1\nproviders: {p: {kind: openai, base_url: 'http://x/v1'}}\n"
        "models: {m: {provider: p}}\n" + chain
    )


async def test_request_side_in_order_response_side_reversed(make_gateway: Any) -> None:
    calls: list[str] = []
    plugins = {n: recorder(n, calls) for n in ("a", "b", "c")}
    gw = await make_gateway(
        "chain:\n  - name: a\n  - name: b\n  - name: c\n", extra_plugins=plugins
    )
    assert calls == ["a.start", "b.start", "c.start"]
    calls.clear()
    async with gw.http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as r:
        assert r.status == 200
        assert r.headers["X-Tollway-Model"] == "gpt-5.4-mini"
        assert r.headers["X-Request-Id"].startswith("req_")
    assert calls == [
        "a.access",
        "b.access",
        "c.access",
        "a.upstream_request",
        "b.upstream_request",
        "c.upstream_request",
        "c.response_headers",
        "b.response_headers",
        "a.response_headers",
        "a.log",
        "b.log",
        "c.log",
    ]


async def test_reply_from_access_short_circuits(make_gateway: Any, emulator: Emulator) -> None:
    calls: list[str] = []
    plugins = {
        "a": recorder("a", calls),
        "b": recorder("b", calls, reply=True),
        "c": recorder("c", calls),
    }
    gw = await make_gateway(
        "chain:\n  - name: a\n  - name: b\n  - name: c\n", extra_plugins=plugins
    )
    before = (await emulator.stats())["requests"]
    calls.clear()
    async with gw.http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as r:
        assert r.status == 200
        assert await r.json() == {"local": "b"}
    # c never saw the request; only a (above b) sees the response side; log runs for all
    assert calls == ["a.access", "b.access", "a.response_headers", "a.log", "b.log", "c.log"]
    assert (await emulator.stats())["requests"] == before


def test_unknown_hook_name_is_refused() -> None:
    class Typo:
        def __init__(self, config: Any, policy: Any) -> None:
            pass

        @hookimpl
        async def acess(self, ctx: RequestContext) -> None:
            pass

    with pytest.raises(PolicyError) as info:
        compile_chain(policy("chain:\n  - name: typo\n"), extra_plugins={"typo": Typo})
    assert info.value.errors[0].startswith("chain[0] (typo): ")
    assert "acess" in info.value.errors[0]


def test_sync_impl_of_async_hook_is_refused() -> None:
    class Sync:
        def __init__(self, config: Any, policy: Any) -> None:
            pass

        @hookimpl
        def access(self, ctx: RequestContext) -> None:
            pass

    with pytest.raises(PolicyError) as info:
        compile_chain(policy("chain:\n  - name: sync\n"), extra_plugins={"sync": Sync})
    assert info.value.errors == ["chain[0] (sync): hook access must be 'async def' (line 5)"]


def test_wrong_argument_name_is_refused() -> None:
    class BadArgs:
        def __init__(self, config: Any, policy: Any) -> None:
            pass

        @hookimpl
        async def access(self, context: RequestContext) -> None:
            pass

    with pytest.raises(PolicyError) as info:
        compile_chain(policy("chain:\n  - name: badargs\n"), extra_plugins={"badargs": BadArgs})
    assert info.value.errors[0].startswith("chain[0] (badargs): ")
    assert "context" in info.value.errors[0]


def test_invalid_config_is_refused_with_plugin_name() -> None:
    class Cfg(BaseModel):
        model_config = ConfigDict(extra="forbid")
        window: int

    class WithConfig:
        Config = Cfg

        def __init__(self, config: Cfg, policy: Any) -> None:
            self.config = config

    with pytest.raises(PolicyError) as info:
        compile_chain(
            policy("chain:\n  - name: wc\n    config: {window: soon}\n"),
            extra_plugins={"wc": WithConfig},
        )
    assert info.value.errors[0].startswith("chain[0] (wc).config.window: ")
    assert info.value.errors[0].endswith("(line 6)")


def test_unused_phases_compile_to_nothing() -> None:
    chain = compile_chain(policy("chain:\n  - name: auth\n"))
    assert chain.names == ("auth",)
    assert len(chain.authenticate) == 1
    assert len(chain.access) == 1  # auth checks a key's model scope once the body is read
    assert chain.response_chunk == () and chain.send_upstream == () and chain.response_body == ()


def test_disabled_plugin_is_skipped() -> None:
    chain = compile_chain(policy("chain:\n  - name: auth\n    enabled: false\n"))
    assert chain.names == ()


async def test_every_phase_can_edit(make_gateway: Any, emulator: Emulator) -> None:
    class Editor:
        def __init__(self, config: Any, policy: Any) -> None:
            pass

        @hookimpl
        async def access(self, ctx: RequestContext) -> None:
            ctx.body["messages"][0]["content"] = "edited by access"

        @hookimpl
        async def upstream_request(self, ctx: RequestContext, req: UpstreamRequest) -> None:
            req.headers["x-plugin-added"] = "yes"

        @hookimpl
        async def response_headers(self, ctx: RequestContext, headers: dict[str, str]) -> None:
            headers["X-Edited"] = str(ctx.status)

        @hookimpl
        def response_chunk(self, ctx: RequestContext, event: StreamEvent) -> None:
            for choice in event.data.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    choice["delta"]["content"] = content.upper()

        @hookimpl
        async def response_body(self, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any]:
            body["edited"] = True
            return body

    gw = await make_gateway("chain:\n  - name: editor\n", extra_plugins={"editor": Editor})
    async with gw.http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as r:
        data = await r.json()
        assert r.headers["X-Edited"] == "200"
    assert data["edited"] is True
    assert "edited by access" in data["choices"][0]["message"]["content"]
    last = await emulator.last()
    assert last["headers"]["x-plugin-added"] == "yes"
    assert last["body"]["messages"][0]["content"] == "edited by access"

    async with gw.http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        text = (await r.read()).decode()
    assert text.rstrip().endswith("data: [DONE]")
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in events if c["choices"])
    assert "EDITED BY ACCESS" in content


async def test_send_upstream_takes_over(make_gateway: Any, emulator: Emulator) -> None:
    class Takeover:
        def __init__(self, config: Any, policy: Any) -> None:
            pass

        @hookimpl
        async def send_upstream(
            self, ctx: RequestContext, req: UpstreamRequest
        ) -> UpstreamResponse:
            body = (
                b'{"id":"x","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,'
                b'"message":{"role":"assistant","content":"from plugin"},"finish_reason":"stop"}],'
                b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
            )
            return UpstreamResponse(status=200, headers={}, body=body)

    seen: list[tuple[int, int]] = []

    class Logger:
        def __init__(self, config: Any, policy: Any) -> None:
            pass

        @hookimpl
        async def log(self, ctx: RequestContext) -> None:
            seen.append((ctx.usage.input_tokens, ctx.usage.output_tokens))

    gw = await make_gateway(
        "chain:\n  - name: logger\n  - name: takeover\n",
        extra_plugins={"takeover": Takeover, "logger": Logger},
    )
    before = (await emulator.stats())["requests"]
    async with gw.http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as r:
        assert (await r.json())["choices"][0]["message"]["content"] == "from plugin"
    assert (await emulator.stats())["requests"] == before
    assert seen == [(3, 2)]


async def test_inline_plugin_sets_a_header_and_takes_over_the_call(
    make_gateway: Any, emulator: Emulator
) -> None:
    """What a third party has, nothing more: a value decided in ``access`` waits in the stash
    and becomes a reply header in ``response_headers`` (the one way to set one), and the
    provider call is taken over with ``send_upstream``'s ``call`` argument: the core's own call,
    which the plugin makes itself (editing the request first) and whose reply it hands back."""
    trace: StashKey[str] = StashKey()
    made: list[tuple[str, int, bool]] = []

    class Tracer:
        def __init__(self, config: Any, policy: Any) -> None:
            pass

        @hookimpl
        async def access(self, ctx: RequestContext) -> None:
            ctx.stash[trace] = "t-" + ctx.request_id[-6:]

        @hookimpl
        async def send_upstream(
            self, ctx: RequestContext, req: UpstreamRequest, call: UpstreamCall
        ) -> UpstreamResponse:
            req.headers["x-trace"] = ctx.stash[trace]
            resp = await call(req)
            made.append((ctx.stash[trace], resp.status, resp.chunks is not None))
            return resp

        @hookimpl
        async def response_headers(self, ctx: RequestContext, headers: dict[str, str]) -> None:
            headers["X-Trace"] = ctx.stash[trace]

    gw = await make_gateway("chain:\n  - name: tracer\n", extra_plugins={"tracer": Tracer})
    before = (await emulator.stats())["requests"]
    async with gw.http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as r:
        assert r.status == 200
        data = await r.json()
        traced = r.headers["X-Trace"]
        assert traced == "t-" + r.headers["X-Request-Id"][-6:]
    assert "hello chain" in data["choices"][0]["message"]["content"]
    assert (await emulator.last())["headers"]["x-trace"] == traced
    assert made == [(traced, 200, False)]

    async with gw.http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        assert r.status == 200
        traced = r.headers["X-Trace"]
        text = (await r.read()).decode()
    assert text.rstrip().endswith("data: [DONE]")
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in events if c["choices"])
    assert "hello chain" in content
    assert made[1:] == [(traced, 200, True)]  # a stream: its chunks relayed as they came
    assert (await emulator.stats())["requests"] == before + 2  # one provider call each


async def test_hook_taking_fewer_arguments_gets_just_those(make_gateway: Any) -> None:
    """pluggy accepts an implementation declaring a subset of its spec's arguments, in any
    order: the compiled chain passes it those (a plugin written before ``send_upstream`` had
    ``call`` keeps working), and logs of a failing hook still name its plugin."""
    seen: list[str] = []

    class Few:
        def __init__(self, config: Any, policy: Any) -> None:
            pass

        @hookimpl
        async def upstream_request(self, req: UpstreamRequest) -> None:
            seen.append(f"upstream_request {req.provider}")

        @hookimpl
        async def send_upstream(self, req: UpstreamRequest, ctx: RequestContext) -> None:
            seen.append(f"send_upstream {req.provider} {ctx.endpoint}")

        @hookimpl
        async def response_headers(self, headers: dict[str, str]) -> None:
            headers["X-Few"] = "yes"

    gw = await make_gateway("chain:\n  - name: few\n", extra_plugins={"few": Few})
    async with gw.http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as r:
        assert r.status == 200
        assert r.headers["X-Few"] == "yes"
    assert seen == ["upstream_request openai", "send_upstream openai chat"]
    chain = gw.gateway.runtime.chain
    assert [chain.name_of(h) for _, h in chain.response_headers] == ["few"]


def test_third_party_plugin_from_entry_point(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plugin installed by another distribution is found through the 'tollway' entry points."""
    pkg = tmp_path / "tollway_stamp.py"
    pkg.write_text(
        "from proxy.hookspecs import hookimpl\n"
        "class Stamp:\n"
        "    def __init__(self, config, policy):\n"
        "        pass\n"
        "    @hookimpl\n"
        "    async def response_headers(self, ctx, headers):\n"
        "        headers['X-Stamp'] = 'yes'\n"
    )
    dist = tmp_path / "tollway_stamp-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tollway-stamp\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[tollway]\nstamp = tollway_stamp:Stamp\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    chain = compile_chain(policy("chain:\n  - name: stamp\n"))
    assert chain.names == ("stamp",)
    assert len(chain.response_headers) == 1
