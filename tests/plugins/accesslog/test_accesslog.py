"""accesslog: one JSON line per request with the facts of the request, never a key or a text.

Each test drives a gateway with the official SDKs (or raw HTTP for a refused key) and reads
the lines back from the file the plugin's writer thread appends to.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any, get_args

import anthropic
import openai
import pytest

from plugins.accesslog import DEFAULT_FIELDS, AccessLogPlugin, FieldName
from proxy.chain import PluginStartError
from tests.conftest import Emulator, Gw, config_error
from tests.security.test_privacy_fields import PII

MSG = [{"role": "user", "content": "Say hi"}]
KEY_A = "a" * 64


def chain(path: Path, *extra: dict[str, Any], **config: Any) -> list[dict[str, Any]]:
    return [
        {"name": "auth"},
        *extra,
        {"name": "accesslog", "config": {"to": str(path), **config}},
    ]


async def lines(path: Path, n: int, wait: float = 20.0) -> list[dict[str, Any]]:
    """The file's first ``n`` lines once they are there (the writer is a thread: it lags)."""
    deadline = time.monotonic() + wait
    while True:
        text = path.read_text() if path.exists() else ""
        got = text.splitlines()
        if len(got) >= n or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert len(got) == n, f"{len(got)} lines, wanted {n}"
    assert text.endswith("\n")
    return [json.loads(line) for line in got]


async def test_chat_line_has_the_default_fields(make_gateway: Any, tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    gw: Gw = await make_gateway(chain(path))
    key = await gw.create_key("alice", "pro")
    reply = await gw.openai(key).chat.completions.with_raw_response.create(
        model="gpt-5.4-mini",
        messages=MSG,  # type: ignore[arg-type]
        extra_headers={"X-Tollway-Feature": "basic_suggestions"},
    )
    body = reply.parse()
    [line] = await lines(path, 1)
    assert list(line) == DEFAULT_FIELDS
    assert line["request_id"] == reply.headers["x-request-id"]
    assert line["user"] == "alice" and line["key_id"]
    assert line["feature"] == "basic_suggestions"
    assert line["model"] == line["served_model"] == "gpt-5.4-mini"
    assert line["route"] == "/v1/chat/completions"
    assert line["status"] == 200 and line["error_code"] is None and line["cache"] is None
    assert body.usage is not None
    assert line["input_tokens"] == body.usage.prompt_tokens > 0
    assert line["output_tokens"] == body.usage.completion_tokens > 0
    assert line["price"] == 0.01
    assert line["latency_ms"] > 0 and 0 < line["ttfb_ms"] <= line["latency_ms"]
    assert line["client_ip"] == "127.0.0.1"
    assert abs(line["ts"] - time.time()) < 60


async def test_stream_line_counts_the_streamed_tokens(make_gateway: Any, tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    gw: Gw = await make_gateway(
        chain(path, fields=["status", "input_tokens", "output_tokens", "ttfb_ms", "latency_ms"])
    )
    key = await gw.create_key()
    stream = await gw.openai(key).chat.completions.create(
        model="gpt-5.4-mini",
        messages=MSG,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
    assert usage is not None
    [line] = await lines(path, 1)
    assert list(line) == ["status", "input_tokens", "output_tokens", "ttfb_ms", "latency_ms"]
    assert line["status"] == 200
    assert line["output_tokens"] == usage.completion_tokens > 0
    assert 0 < line["ttfb_ms"] <= line["latency_ms"]


async def test_cache_hit_is_logged_as_a_hit(make_gateway: Any, tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    cache = {"name": "cache", "config": {"scope": "user", "key": KEY_A, "default_ttl": "1h"}}
    gw: Gw = await make_gateway(chain(path, cache))
    client = gw.openai(await gw.create_key())
    for _ in range(2):
        await client.chat.completions.create(model="gpt-5.4-mini", messages=MSG)  # type: ignore[arg-type]
    first, second = await lines(path, 2)
    assert (first["cache"], second["cache"]) == ("miss", "hit")
    assert second["status"] == 200 and second["served_model"] == "gpt-5.4-mini"


async def test_refusals_429_and_401(make_gateway: Any, tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    limits = {"name": "limits", "config": {"user": ["1 per 10 second"]}}
    gw: Gw = await make_gateway(chain(path, limits))
    client = gw.openai(await gw.create_key("bob", "pro"))
    await client.chat.completions.create(model="gpt-5.4-mini", messages=MSG)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-5.4-mini", messages=MSG)  # type: ignore[arg-type]
    with pytest.raises(openai.AuthenticationError):
        await gw.openai("tw_not-a-key").chat.completions.create(model="gpt-5.4-mini", messages=MSG)  # type: ignore[arg-type]
    ok, limited, refused = await lines(path, 3)
    assert ok["status"] == 200
    assert limited["status"] == 429 and limited["user"] == "bob"
    assert limited["error_code"] == "user_rate_limit_exceeded"
    assert limited["price"] == 0 and limited["output_tokens"] == 0
    assert refused["status"] == 401 and refused["error_code"]
    assert refused["user"] is None and refused["key_id"] is None


async def test_translated_route(make_gateway: Any, tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    gw: Gw = await make_gateway(
        chain(
            path,
            fields=[
                "route",
                "model",
                "served_model",
                "provider",
                "endpoint",
                "status",
                "output_tokens",
            ],
        )
    )
    reply = await gw.anthropic(await gw.create_key()).messages.create(
        model="gpt-5.4-mini", max_tokens=50, messages=[{"role": "user", "content": "Say hi"}]
    )
    [line] = await lines(path, 1)
    assert line == {
        "route": "/v1/messages",
        "model": "gpt-5.4-mini",
        "served_model": "gpt-5.4-mini",
        "provider": "openai",
        "endpoint": "messages",
        "status": 200,
        "output_tokens": reply.usage.output_tokens,
    }


async def test_no_key_prompt_or_completion_reaches_the_file(
    make_gateway: Any, emulator: Emulator, tmp_path: Path
) -> None:
    """The privacy corpus as prompts (both dialects, answered and streamed) and as keys, a
    real key, the provider key: none of them, nor the model's answer, is in the file."""
    path = tmp_path / "access.jsonl"
    all_fields = list(get_args(FieldName))
    gw: Gw = await make_gateway(chain(path, fields=all_fields))
    key = await gw.create_key("alice", "pro")
    oa, an = gw.openai(key), gw.anthropic(key)
    answers: list[str] = []
    sent = 0
    for _, value in PII:
        sent += 3
        text = f"Please remember {value} for later"
        reply = await oa.chat.completions.create(
            model="gpt-5.4-mini", messages=[{"role": "user", "content": text}], user=value
        )
        answers.append(reply.choices[0].message.content or "")
        msg = await an.messages.create(
            model="claude-sonnet", max_tokens=50, messages=[{"role": "user", "content": text}]
        )
        answers.extend(b.text for b in msg.content if b.type == "text")
        async for _ in await oa.chat.completions.create(
            model="gpt-5.4-mini", messages=[{"role": "user", "content": text}], stream=True
        ):
            pass
        if not value.isascii():  # a header value is ASCII: the SDKs cannot send the others
            continue
        sent += 2
        with pytest.raises(openai.AuthenticationError):
            await gw.openai(value).chat.completions.create(model="gpt-5.4-mini", messages=MSG)  # type: ignore[arg-type]
        with pytest.raises(anthropic.AuthenticationError):
            await gw.anthropic(value).messages.create(
                model="claude-sonnet", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
    got = await lines(path, sent)
    assert {line["status"] for line in got} == {200, 401}
    text = path.read_text()
    secrets = [value for _, value in PII] + [key, "upstream-secret", "Please remember"]
    for secret in secrets:
        assert secret not in text, secret
        assert json.dumps(secret)[1:-1] not in text, secret
    for answer in answers:
        assert answer and answer not in text


async def test_burst_is_written_by_the_background_writer(make_gateway: Any, tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    gw: Gw = await make_gateway(chain(path, fields=["request_id", "status"]))
    writer = next(
        p for p in gw.gateway.runtime.chain.plugins if isinstance(p, AccessLogPlugin)
    ).writer
    assert writer is not None
    thread = writer._thread
    assert thread is not None and thread.is_alive() and thread is not threading.current_thread()
    key = await gw.create_key()
    gate = asyncio.Semaphore(50)

    async def one() -> str:
        async with (
            gate,
            gw.http.post(
                f"{gw.url}/v1/chat/completions",
                json={"model": "gpt-5.4-mini", "messages": MSG},
                headers={"Authorization": f"Bearer {key}"},
            ) as r,
        ):
            assert r.status == 200
            return r.headers["x-request-id"]

    ids = await asyncio.gather(*(one() for _ in range(500)))
    got = await lines(path, 500, wait=60)
    assert sorted(line["request_id"] for line in got) == sorted(ids)
    assert writer.written == 500 and writer.dropped == 0


def test_config_errors() -> None:
    assert "fields listed twice: status" in config_error("accesslog", "{fields: [status, status]}")
    assert "fields" in config_error("accesslog", "{fields: [prompt]}")
    assert "at least one" in config_error("accesslog", "{fields: []}")


async def test_unwritable_file_fails_at_start(make_gateway: Any, tmp_path: Path) -> None:
    with pytest.raises(PluginStartError, match="plugin accesslog could not start: cannot open"):
        await make_gateway(chain(tmp_path / "missing" / "access.jsonl"))
