"""Bad input and failing upstreams: provider-shaped errors, never a 500 or a stack trace."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiohttp
import pytest

from tests.conftest import Emulator, Gw
from tests.procs import until

SLOW_POLICY = """
version: 1
admin: {{key: {admin}}}
state: {{dir: null}}
listen: {{max_body_bytes: 4096}}
providers:
  openai: {{kind: openai, base_url: "{emu}/v1", api_key: upstream-secret, timeout: {{read: 300ms}},
           retries: {{attempts: 1, backoff: 10ms}}}}
  anthropic: {{kind: anthropic, base_url: "{emu}", api_key: upstream-secret, timeout: {{read: 300ms}}}}
  down: {{kind: openai, base_url: "http://127.0.0.1:9/v1", api_key: x, retries: {{attempts: 1, backoff: 10ms}}}}
models:
  gpt-5.4-mini: {{provider: openai}}
  claude-sonnet: {{provider: anthropic}}
  gone: {{provider: down}}
"""

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"


@pytest.fixture
async def bad(make_gateway: Any) -> tuple[Gw, dict[str, str]]:
    gw = await make_gateway("chain:\n  - name: auth\n", base=SLOW_POLICY)
    key = await gw.create_key()
    return gw, {"Authorization": f"Bearer {key}"}


async def call(
    gw: Gw,
    path: str,
    headers: dict[str, str],
    data: Any = None,
    *,
    method: str = "POST",
    json: Any = None,
) -> tuple[int, dict[str, Any], Any]:
    async with gw.http.request(method, gw.url + path, headers=headers, data=data, json=json) as r:
        body = await r.read()
        assert b"Traceback" not in body
        import orjson

        return r.status, r.headers.copy(), orjson.loads(body)  # type: ignore[return-value]


def assert_openai_error(body: Any, code: str | None = None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code


def assert_anthropic_error(body: Any) -> None:
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["message"]


async def test_malformed_json(bad: tuple[Gw, dict[str, str]]) -> None:
    gw, auth = bad
    h = {**auth, "Content-Type": "application/json"}
    status, headers, body = await call(gw, CHAT, h, data=b'{"model": "gpt-5.4-mini",')
    assert status == 400
    assert_openai_error(body, "invalid_json")
    assert headers["X-Request-Id"].startswith("req_")
    status, _, body = await call(gw, MESSAGES, h, data=b"[1, 2]")
    assert status == 400
    assert_anthropic_error(body)
    assert body["error"]["type"] == "invalid_request_error"
    status, _, body = await call(gw, CHAT, h, data=b"")
    assert status == 400


async def test_missing_and_unknown_model(bad: tuple[Gw, dict[str, str]]) -> None:
    gw, auth = bad
    status, _, body = await call(gw, CHAT, auth, json={"messages": []})
    assert status == 400
    assert_openai_error(body, "missing_model")
    assert body["error"]["param"] == "model"
    status, _, body = await call(gw, CHAT, auth, json={"model": 5, "messages": []})
    assert status == 400
    status, _, body = await call(gw, CHAT, auth, json={"model": "nope", "messages": []})
    assert status == 404
    assert_openai_error(body, "model_not_found")
    status, _, body = await call(gw, MESSAGES, auth, json={"model": "nope", "max_tokens": 5})
    assert status == 404
    assert_anthropic_error(body)
    assert body["error"]["type"] == "not_found_error"


async def test_body_too_large(bad: tuple[Gw, dict[str, str]]) -> None:
    gw, auth = bad
    big = {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "x" * 5000}]}
    status, _, body = await call(gw, CHAT, auth, json=big)
    assert status == 413
    assert_openai_error(body, "request_too_large")

    async def chunked() -> Any:
        for _ in range(10):
            yield b"x" * 1000

    status, _, body = await call(
        gw, MESSAGES, {**auth, "Content-Type": "application/json"}, data=chunked()
    )
    assert status == 413
    assert body["error"]["type"] == "request_too_large"


async def test_wrong_content_type(bad: tuple[Gw, dict[str, str]]) -> None:
    gw, auth = bad
    status, _, body = await call(
        gw, CHAT, {**auth, "Content-Type": "text/plain"}, data=b'{"model": "gpt-5.4-mini"}'
    )
    assert status == 415
    assert_openai_error(body, "unsupported_media_type")


async def test_unknown_path_and_method(bad: tuple[Gw, dict[str, str]]) -> None:
    gw, auth = bad
    status, _, body = await call(gw, "/v1/nothing", auth, json={})
    assert status == 404
    assert_openai_error(body, "not_found")
    status, _, body = await call(gw, CHAT, auth, method="GET")
    assert status == 405
    assert_openai_error(body, "method_not_allowed")


async def test_upstream_unreachable_is_502(bad: tuple[Gw, dict[str, str]]) -> None:
    gw, auth = bad
    status, _, body = await call(
        gw, CHAT, auth, json={"model": "gone", "messages": [{"role": "user", "content": "x"}]}
    )
    assert status == 502
    assert_openai_error(body, "upstream_unreachable")


async def test_upstream_timeout_is_504(bad: tuple[Gw, dict[str, str]]) -> None:
    gw, auth = bad
    t0 = time.monotonic()
    status, _, body = await call(
        gw,
        CHAT,
        {**auth, "x-emulator-latency-ms": "2000"},
        json={"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "x"}]},
    )
    assert status == 504
    assert_openai_error(body, "upstream_timeout")
    assert time.monotonic() - t0 < 1.5  # read timeout 300ms; timeouts are not retried
    status, _, body = await call(
        gw,
        MESSAGES,
        {**auth, "x-emulator-latency-ms": "2000"},
        json={
            "model": "claude-sonnet",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "x"}],
        },
    )
    assert status == 504
    assert body["error"]["type"] == "timeout_error" or body["type"] == "error"


async def wait_idle(emulator: Emulator, within: float = 3.0) -> int:
    """Requests still at the emulator once none are, or after ``within`` seconds."""

    async def idle() -> bool:
        return await emulator.in_flight() == 0

    with contextlib.suppress(AssertionError):  # the caller's assertion shows the count
        await until(idle, within)
    return await emulator.in_flight()


async def test_client_disconnect_cancels_upstream(
    bad: tuple[Gw, dict[str, str]], emulator: Emulator
) -> None:
    gw, auth = bad
    body = {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "x"}]}
    # non-streamed: the client gives up while the provider is still thinking
    with pytest.raises(asyncio.TimeoutError):
        await gw.http.post(
            gw.url + CHAT,
            json=body,
            headers={**auth, "x-emulator-hang": "1"},
            timeout=aiohttp.ClientTimeout(total=0.3),
        )
    assert await wait_idle(emulator) == 0
    # streamed: the client reads two events and hangs up
    headers = {**auth, "x-emulator-words": "200", "x-emulator-chunk-delay-ms": "20"}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(gw.url + CHAT, json={**body, "stream": True}, headers=headers)
        await resp.content.readuntil(b"\n\n")
        await resp.content.readuntil(b"\n\n")
        assert (await emulator.stats())["in_flight"] >= 1
        resp.close()
    assert await wait_idle(emulator) == 0
