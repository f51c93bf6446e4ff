"""Hooks limited to some endpoints (``proxy.hookspecs.endpoints``): called there, and only there.

A plugin that serves one API (the ``responses`` plugin: ``/v1/responses``) declares it, and the
chain is compiled once per endpoint: on the others its hooks are not called at all, and a
``response_chunk`` limited to another endpoint does not make the core parse a stream's events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from proxy.chain import compile_chain
from proxy.context import RequestContext, StreamEvent
from proxy.hookspecs import endpoints, hookimpl
from proxy.policy import PolicyError, load_text
from tests.conftest import Gw

NO_AUTH = "chain:\n  - name: only\n  - name: every\n"


def plugins(seen: list[str]) -> dict[str, Any]:
    """``only``: hooks limited to messages; ``every``: the same hooks, unlimited."""

    class Only:
        def __init__(self, config: Any, policy: Any) -> None:
            pass

        @hookimpl
        @endpoints("messages")
        async def access(self, ctx: RequestContext) -> None:
            seen.append(f"only.access {ctx.endpoint}")

        @hookimpl
        @endpoints("messages")
        def response_chunk(self, ctx: RequestContext, event: StreamEvent) -> None:
            event.data["x_only"] = True  # seen by the client if it ran for another endpoint
            if event.name == "message_start":
                seen.append(f"only.chunk {ctx.endpoint}")

        @hookimpl
        @endpoints("messages")
        async def response_headers(self, ctx: RequestContext, headers: dict[str, str]) -> None:
            headers["X-Only"] = ctx.endpoint

        @hookimpl
        @endpoints("messages")
        async def log(self, ctx: RequestContext) -> None:
            seen.append(f"only.log {ctx.endpoint}")

    class Every:
        def __init__(self, config: Any, policy: Any) -> None:
            pass

        @hookimpl
        async def access(self, ctx: RequestContext) -> None:
            seen.append(f"every.access {ctx.endpoint}")

        @hookimpl
        async def log(self, ctx: RequestContext) -> None:
            seen.append(f"every.log {ctx.endpoint}")

    return {"only": Only, "every": Every}


async def chat_stream_raw(gw: Gw) -> bytes:
    """A streamed chat completion's body as it reached the client."""
    body = {
        "model": "gpt-5.4-mini",
        "stream": True,
        "messages": [{"role": "user", "content": "hello endpoints"}],
    }
    async with gw.http.post(f"{gw.url}/v1/chat/completions", json=body) as r:
        assert r.status == 200
        assert "X-Only" not in r.headers
        return await r.read()


async def test_limited_hooks_run_on_their_endpoint_only(make_gateway: Any) -> None:
    seen: list[str] = []
    gw = await make_gateway(NO_AUTH, extra_plugins=plugins(seen))
    out = await gw.openai("k").chat.completions.create(
        model="gpt-5.4-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert out.choices[0].message.content
    assert seen == ["every.access chat", "every.log chat"]
    seen.clear()

    async with gw.anthropic("k").messages.stream(
        model="claude-sonnet", max_tokens=32, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = await stream.get_final_text()
        assert stream.response.headers["X-Only"] == "messages"
    assert text
    assert seen == [
        "only.access messages",
        "every.access messages",
        "only.chunk messages",
        "only.log messages",
        "every.log messages",
    ]


async def test_chunk_hook_of_another_endpoint_is_not_in_chat_streams(make_gateway: Any) -> None:
    """A chunk hook limited to messages is not in chat's compiled tuple: a chat stream's
    events are relayed as the provider sent them, unparsed (the relay parses only when the
    endpoint's chain has a chunk hook), and never edited by it."""
    seen: list[str] = []
    gw = await make_gateway(NO_AUTH, extra_plugins=plugins(seen))
    views = gw.gateway.runtime.chain.views
    assert views["chat"].response_chunk == () and len(views["messages"].response_chunk) == 1
    raw = await chat_stream_raw(gw)
    assert raw.count(b"data: ") > 2 and b"x_only" not in raw
    assert not any(s.startswith("only.") for s in seen)

    none = await make_gateway("chain:\n  - name: every\n", extra_plugins=plugins(seen))
    assert none.gateway.runtime.chain.views == {}  # nothing limited: no view to pick


def _policy(chain: str) -> Any:
    return load_text(
        "version: 1\nproviders: {p: {kind: openai, base_url: 'http://x/v1'}}\n"
        "models: {m: {provider: p}}\n" + chain
    )


def test_unknown_endpoint_name_is_refused() -> None:
    with pytest.raises(ValueError, match="chats"):
        endpoints("chats")
    with pytest.raises(ValueError, match="none"):
        endpoints()


def test_hook_not_per_request_cannot_be_limited() -> None:
    class Odd:
        def __init__(self, config: Any, policy: Any) -> None:
            pass

        @hookimpl
        @endpoints("chat")
        async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
            yield

    with pytest.raises(PolicyError, match="lifespan runs once, not per request"):
        compile_chain(_policy("chain:\n  - name: odd\n"), extra_plugins={"odd": Odd})


def test_responses_plugin_is_not_in_chat_requests_hooks() -> None:
    chain = compile_chain(_policy("chain:\n  - name: responses\n"))
    chat = chain.for_endpoint("chat")
    assert chat.access == () and chat.response_chunk == ()
    assert chat.response_body == () and chat.response_complete == ()
    assert len(chain.for_endpoint("responses").response_chunk) == 1
    assert len(chain.for_endpoint("input_tokens").access) == 1
    assert chain.for_endpoint("input_tokens").response_complete == ()
