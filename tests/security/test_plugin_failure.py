"""A plugin whose response-side hook raises cannot turn a reply into aiohttp's plain-text 500.

Hooks run on the error path too (``send_error``): a hook failing there used to escape the
handler, so the client got ``500 Internal Server Error`` as text instead of the provider's
error, and the failure was not tied to a request id. Now the client gets a provider-shaped
reply, and the failure is logged at most once per request (plugin, hook, request id, no body)
and without flooding: a tenant who makes every request fail a hook gets the first failure
logged with its traceback, then one line per interval counting the rest (``relay.HOOK_ERRORS``).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from proxy import relay
from proxy.context import RequestContext, StreamEvent
from proxy.failurelog import ErrorLog
from proxy.hookspecs import hookimpl
from tests.conftest import Gw

PROMPT = "the secret plan is 7f3a9c"
CHAT = {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": PROMPT}]}


class Boom(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def fresh_error_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[ErrorLog]:
    """Each test starts with no failure kind known (the log is the process's)."""
    errors = ErrorLog(relay.log)
    monkeypatch.setattr(relay, "HOOK_ERRORS", errors)
    yield errors


def boom_plugin(fail: set[str], calls: list[str]) -> type:
    """A throwaway plugin whose hooks named in ``fail`` raise; every call is recorded."""

    class BoomPlugin:
        def __init__(self, config: Any, policy: Any) -> None:
            pass

        def _hit(self, hook: str) -> None:
            calls.append(hook)
            if hook in fail:
                raise Boom(f"{hook} broke")

        @hookimpl
        async def response_headers(self, ctx: RequestContext, headers: dict[str, str]) -> None:
            headers["X-Boom"] = "edited"  # undone when the hook then fails on an error reply
            self._hit("response_headers")

        @hookimpl
        def response_chunk(self, ctx: RequestContext, event: StreamEvent) -> None:
            self._hit("response_chunk")

        @hookimpl
        async def response_body(self, ctx: RequestContext, body: dict[str, Any]) -> None:
            self._hit("response_body")

        @hookimpl
        async def response_complete(self, ctx: RequestContext) -> None:
            self._hit("response_complete")

        @hookimpl
        async def log(self, ctx: RequestContext) -> None:
            calls.append(f"log:{ctx.status}:{ctx.error_code}")

    return BoomPlugin


async def gateway(make_gateway: Any, fail: set[str], calls: list[str]) -> Gw:
    gw: Gw = await make_gateway(
        "chain:\n  - name: auth\n  - name: boom\n",
        extra_plugins={"boom": boom_plugin(fail, calls)},
    )
    return gw


def failures(caplog: pytest.LogCaptureFixture, request_id: str) -> list[logging.LogRecord]:
    """The log records about plugin boom; each must name the request and carry no body."""
    records = [r for r in caplog.records if "plugin boom failed" in r.getMessage()]
    for r in records:
        text = r.getMessage() + logging.Formatter().formatException(r.exc_info or (None,) * 3)  # type: ignore[arg-type]
        assert request_id in r.getMessage() and PROMPT not in text
    return records


@pytest.mark.parametrize("hook", ["response_headers", "response_complete"])
async def test_a_failing_hook_on_the_error_path_keeps_the_providers_error(
    make_gateway: Any, caplog: pytest.LogCaptureFixture, hook: str
) -> None:
    calls: list[str] = []
    gw = await gateway(make_gateway, {hook}, calls)
    key = await gw.create_key()
    caplog.set_level(logging.ERROR, logger="tollway")

    # OpenAI route, an unknown model: a 404 that runs the hooks of the error reply
    client = gw.openai(key)
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="no-such-model", messages=CHAT["messages"])  # type: ignore[arg-type]
    resp = info.value.response
    assert resp.headers["content-type"].startswith("application/json")
    assert info.value.code == "model_not_found" and info.value.type is not None
    assert hook in calls  # the hook ran on the error path, and raised
    # a failed header hook's edits are undone; a hook that did not fail keeps its edits
    assert ("X-Boom" in resp.headers) == (hook != "response_headers")
    rid = resp.headers["X-Request-Id"]
    assert len(failures(caplog, rid)) == 1
    assert calls[-1] == "log:404:model_not_found"  # log hooks still see the real outcome

    # Anthropic route: the same in the Anthropic shape
    caplog.clear()
    with pytest.raises(anthropic.NotFoundError) as ainfo:
        await gw.anthropic(key).messages.create(
            model="no-such-model", max_tokens=10, messages=[{"role": "user", "content": PROMPT}]
        )
    assert ainfo.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": ainfo.value.body["error"]["message"]},  # type: ignore[index]
    }
    # the same plugin, hook and exception again within the interval: counted, not logged
    assert not failures(caplog, ainfo.value.response.headers["X-Request-Id"])

    # no key at all: the 401 is shaped too
    async with gw.http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as r:
        assert r.status == 401 and r.content_type == "application/json"
        assert (await r.json())["error"]["code"] == "missing_api_key"


@pytest.mark.parametrize("hook", ["response_headers", "response_body", "response_complete"])
async def test_a_failing_hook_on_a_reply_is_a_shaped_500_logged_once(
    make_gateway: Any, caplog: pytest.LogCaptureFixture, hook: str
) -> None:
    calls: list[str] = []
    fail = {hook}
    gw = await gateway(make_gateway, fail, calls)
    key = await gw.create_key()
    caplog.set_level(logging.ERROR, logger="tollway")
    with pytest.raises(openai.InternalServerError) as info:
        await gw.openai(key).chat.completions.create(**CHAT)  # type: ignore[call-overload]
    resp = info.value.response
    assert resp.status_code == 500 and resp.headers["content-type"].startswith("application/json")
    assert info.value.code == "internal_error"
    # the hook failed on the reply, then ran (and failed) again on the error reply, which has
    # no body hooks: one log line either way
    assert calls.count(hook) == (1 if hook == "response_body" else 2)
    assert len(failures(caplog, resp.headers["X-Request-Id"])) == 1
    assert not [r for r in caplog.records if "internal error in request" in r.getMessage()]
    assert calls[-1] == "log:500:internal_error"
    fail.clear()  # the plugin recovers: the same gateway serves normally again
    reply = await gw.openai(key).chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert reply.choices[0].message.content and calls[-1] == "log:200:None"


@pytest.mark.parametrize("hook", ["response_chunk", "response_complete"])
async def test_a_failing_hook_in_a_stream_ends_it_with_an_error_event(
    make_gateway: Any, caplog: pytest.LogCaptureFixture, hook: str
) -> None:
    calls: list[str] = []
    gw = await gateway(make_gateway, {hook}, calls)
    key = await gw.create_key()
    caplog.set_level(logging.ERROR, logger="tollway")
    headers = {"Authorization": f"Bearer {key}"}
    async with gw.http.post(
        f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers
    ) as r:
        assert r.status == 200  # the headers went out before the hook failed
        text = (await r.read()).decode()
        rid = r.headers["X-Request-Id"]
    assert hook in calls
    assert "data: [DONE]" not in text  # not a clean finish
    assert '"code":"internal_error"' in text.replace(" ", "")
    assert text.count("HTTP/1.1") == 0  # no second response written into the stream
    assert len(failures(caplog, rid)) == 1
    assert calls[-1] == "log:500:internal_error"

    # the SDK sees the error too, never a clean end
    with pytest.raises(openai.APIError):
        stream = await gw.openai(key).chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
        async for _ in stream:
            pass


async def test_a_flood_of_failing_requests_cannot_flood_the_log(
    make_gateway: Any, caplog: pytest.LogCaptureFixture, fresh_error_log: ErrorLog
) -> None:
    """300 requests that each make a hook fail: the first is logged with its traceback and
    request id, the rest are counted; after the interval one line gives their number and the
    latest request id. No line carries the prompt or the key."""
    fresh_error_log.every = 1.0
    calls: list[str] = []
    gw = await gateway(make_gateway, {"response_body"}, calls)
    key = await gw.create_key()
    caplog.set_level(logging.INFO, logger="tollway")
    headers = {"Authorization": f"Bearer {key}"}

    async def post() -> str:
        async with gw.http.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers=headers) as r:
            assert r.status == 500 and (await r.json())["error"]["code"] == "internal_error"
            return r.headers["X-Request-Id"]

    ids = [await post()]
    for _ in range(23):
        ids += await asyncio.gather(*(post() for _ in range(13)))
    assert len(ids) == 300 and calls.count("response_body") == 300
    lines = [r for r in caplog.records if "plugin boom failed" in r.getMessage()]
    assert len(lines) <= 2, [r.getMessage() for r in lines]  # 300 failures, a line or two
    first = lines[0]
    assert ids[0] in first.getMessage() and "response_body" in first.getMessage()
    assert first.exc_info is not None and first.exc_info[0] is Boom

    await asyncio.sleep(1.1)  # the interval ends: the next failure is a counting line
    last = await post()
    lines = [r for r in caplog.records if "plugin boom failed" in r.getMessage()]
    assert len(lines) <= 3
    periodic = lines[-1]
    assert periodic.exc_info is None and last in periodic.getMessage()
    assert "Boom again (" in periodic.getMessage()
    # every one of the 301 failures has a line of its own or is counted in a later one
    counted = [re.search(r"\((\d+) more since the last line", r.getMessage()) for r in lines[1:]]
    assert sum(int(m.group(1)) for m in counted if m) + len(lines) == 301
    for record in caplog.records:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        assert PROMPT not in text and key not in text
