"""Odd input a client can send without a key: bytes that are not UTF-8 in headers, JSON nested
between what orjson parses and what it writes, odd JSON values. Each is a 4xx in the route's
provider shape with X-Request-Id, is metered with its status, and leaves no traceback in the log.

Headers with raw bytes go over a plain socket: HTTP clients refuse to send them.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anthropic
import openai
import orjson
import pytest

from proxy.edge import MAX_JSON_DEPTH
from tests.conftest import ADMIN_KEY, BASE_POLICY, Emulator, Gw

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"

# the gateway trusts the loopback peer's X-Forwarded-For, so that header reaches client_ip
BASE = BASE_POLICY + 'listen: {{trusted_proxies: ["127.0.0.1/32"]}}\n'


def chain(db: Path) -> str:
    # the cache fingerprints (serialises) every body; metering writes every request's row
    return (
        "chain:\n  - name: auth\n  - name: cache\n    config: {default_ttl: 1h}\n"
        f"  - name: metering\n    config: {{database: {db}, flush_interval: 50ms}}\n"
    )


@pytest.fixture
async def gw(make_gateway: Any, tmp_path: Path) -> Gw:
    return await make_gateway(chain(tmp_path / "usage.duckdb"), base=BASE)  # type: ignore[no-any-return]


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def raw(
    gw: Gw, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> tuple[int, dict[str, str], Any]:
    """Send a request byte for byte; (status, lower-cased headers, parsed JSON body)."""
    url = urlsplit(gw.url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    head = [f"{method} {path} HTTP/1.1".encode(), b"Host: gateway", b"Connection: close"]
    head += [k + b": " + v for k, v in headers]
    head.append(b"Content-Length: " + str(len(body)).encode())
    writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    top, _, payload = data.partition(b"\r\n\r\n")
    status_line, *lines = top.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines)
    assert b"Traceback" not in payload
    return (
        int(status_line.split()[1]),
        {k.lower(): v for k, v in fields.items()},
        orjson.loads(payload),
    )


def assert_error_shape(path: str, body: Any) -> None:
    if path == MESSAGES:
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    else:
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]


async def usage_row(gw: Gw, request_id: str) -> dict[str, Any]:
    query = (
        f"SELECT status, error_code, feature, user_id FROM usage WHERE request_id = '{request_id}'"
    )
    async with gw.http.post(f"{gw.url}/admin/sql", json={"query": query}, headers=ADMIN) as r:
        assert r.status == 200, await r.text()
        res = await r.json()
    assert len(res["rows"]) == 1, f"no usage row for {request_id}"
    return dict(zip(res["columns"], res["rows"][0], strict=True))


def chat_body(model: str = "gpt-5.4-mini", **extra: Any) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **extra})


def messages_body(model: str = "claude-sonnet", **extra: Any) -> bytes:
    return orjson.dumps(
        {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}], **extra}
    )


JSON = (b"Content-Type", b"application/json")

# (case, path, header, bad bytes, the same header with good bytes: what the request then gets)
BAD_HEADERS = [
    ("bearer", CHAT, b"Authorization", b"Bearer tw_\xff\xfe", b"Bearer tw_unknown", 401),
    ("x-api-key", MESSAGES, b"x-api-key", b"tw_\xff\xfe", b"tw_unknown", 401),
    ("feature", CHAT, b"X-Tollway-Feature", b"caf\xe9", b"caf\xc3\xa9", 200),
    ("feature-surrogate", MESSAGES, b"X-Tollway-Feature", b"\xed\xa0\x80", b"basic", 200),
    ("forwarded-for", CHAT, b"X-Forwarded-For", b"10.0.0.\xff", b"10.0.0.1", 200),
    ("anthropic-version", MESSAGES, b"anthropic-version", b"2023-06-01\xff", b"2023-06-01", 200),
    ("forwarded-header", CHAT, b"X-Custom", b"\x80\x81", b"plain", 200),
]


@pytest.mark.parametrize(
    ("path", "name", "bad", "good", "good_status"),
    [case[1:] for case in BAD_HEADERS],
    ids=[case[0] for case in BAD_HEADERS],
)
async def test_header_bytes_that_are_not_utf8(
    gw: Gw,
    logs: pytest.LogCaptureFixture,
    path: str,
    name: bytes,
    bad: bytes,
    good: bytes,
    good_status: int,
) -> None:
    key = (await gw.create_key("odd", "pro")).encode()
    body = messages_body() if path == MESSAGES else chat_body()
    auth = (
        [] if name in (b"Authorization", b"x-api-key") else [(b"Authorization", b"Bearer " + key)]
    )

    # the same request with decodable bytes in that header reaches the key lookup or is served,
    # and the header's value is what metering records (here: the feature)
    status, headers, reply = await raw(gw, "POST", path, [JSON, *auth, (name, good)], body)
    assert status == good_status, reply
    if name == b"X-Tollway-Feature":
        row = await usage_row(gw, headers["x-request-id"])
        assert row["feature"] == good.decode()

    status, headers, reply = await raw(gw, "POST", path, [JSON, *auth, (name, bad)], body)
    assert status == 400, reply
    assert_error_shape(path, reply)
    assert name.decode() in reply["error"]["message"] and "UTF-8" in reply["error"]["message"]
    request_id = headers["x-request-id"]
    assert request_id.startswith("req_")
    row = await usage_row(gw, request_id)
    assert (row["status"], row["error_code"]) == (400, "invalid_header")
    assert row["feature"] == "basic_suggestions"  # the policy default: the bad value is not kept
    assert_no_traceback(logs)


async def test_admin_key_bytes_that_are_not_utf8(gw: Gw, logs: pytest.LogCaptureFixture) -> None:
    good = [(b"Authorization", b"Bearer " + ADMIN_KEY.encode())]
    status, _, reply = await raw(gw, "GET", "/admin/keys", good)
    assert status == 200 and "data" in reply
    for value in (b"Bearer \xff\xfe", b"Bearer " + ADMIN_KEY.encode() + b"\xff"):
        status, headers, reply = await raw(gw, "GET", "/admin/keys", [(b"Authorization", value)])
        assert status == 401, reply
        assert_error_shape("/admin/keys", reply)
        assert reply["error"]["code"] == "invalid_admin_key"
        assert headers.get("x-request-id", "").startswith("req_")
    assert_no_traceback(logs)


async def test_models_list_with_key_bytes_that_are_not_utf8(
    gw: Gw, logs: pytest.LogCaptureFixture
) -> None:
    key = (await gw.create_key("odd", "pro")).encode()
    status, _, reply = await raw(gw, "GET", "/v1/models", [(b"Authorization", b"Bearer " + key)])
    assert status == 200 and reply["object"] == "list"
    bad = [(b"Authorization", b"Bearer " + key + b"\xff")]
    status, headers, reply = await raw(gw, "GET", "/v1/models", bad)
    assert status == 401, reply
    assert_error_shape(CHAT, reply)
    assert headers.get("x-request-id", "").startswith("req_")
    # with anthropic-version (odd bytes in it too) the list and its errors are Anthropic's
    odd_version = (b"anthropic-version", b"\xff")
    status, _, reply = await raw(gw, "GET", "/v1/models", [*bad, odd_version])
    assert status == 401
    assert_error_shape(MESSAGES, reply)
    status, _, reply = await raw(
        gw, "GET", "/v1/models", [(b"x-api-key", key), odd_version, (b"anthropic-version", b"")]
    )
    assert status == 200 and reply["has_more"] is False
    assert_no_traceback(logs)


async def test_admin_routes_with_odd_bytes_in_path_and_query(
    gw: Gw, logs: pytest.LogCaptureFixture
) -> None:
    """Percent-escapes that are not UTF-8 stay escaped in a path and become U+FFFD in a query
    (yarl): they reach the usage queries as plain text, never as bytes that fail."""
    admin = [(b"Authorization", f"Bearer {ADMIN_KEY}".encode())]
    status, _, reply = await raw(gw, "GET", "/admin/invoices/%ed%a0%80?month=2026-01", admin)
    assert status == 200, reply
    assert reply["user"].lower() == "%ed%a0%80" and reply["lines"] == []
    for query in ("month=%ff", "month=2026-01%00", "month=%ed%a0%80&format=%ff"):
        status, headers, reply = await raw(gw, "GET", f"/admin/invoices/bob?{query}", admin)
        assert status == 400, reply
        assert_error_shape("/admin/invoices", reply)
        assert reply["error"]["param"] == "month"
        assert headers.get("x-request-id", "").startswith("req_")
    status, _, reply = await raw(gw, "GET", "/admin/invoices/bob?month=2026-01&format=%ff", admin)
    assert status == 200 and reply["user"] == "bob"  # an unknown format is the JSON invoice
    status, _, reply = await raw(gw, "DELETE", "/admin/users/%ff%0a/data", admin)
    assert status == 200 and reply["deleted"]["usage_rows"] == 0
    status, _, reply = await raw(gw, "DELETE", "/admin/keys/%ff", admin)
    assert status == 404
    assert_error_shape("/admin/keys", reply)
    assert_no_traceback(logs)


def nested(depth: int) -> bytes:
    """JSON text of a value ``depth`` levels deep (arrays and objects alternating); written by
    hand, since orjson cannot write what is deeper than about 254 levels."""
    value = b'"leaf"'
    for level in range(depth):
        value = b'{"a":' + value + b"}" if level % 2 else b"[" + value + b"]"
    return value


def with_field(body: bytes, name: str, value: bytes) -> bytes:
    """``body`` (a JSON object's text) with one more field."""
    return body[:-1] + b',"' + name.encode() + b'":' + value + b"}"


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
async def test_json_nested_deeper_than_the_limit(
    gw: Gw, logs: pytest.LogCaptureFixture, path: str
) -> None:
    key = await gw.create_key("deep", "pro")
    auth = [JSON, (b"Authorization", f"Bearer {key}".encode())]
    make = messages_body if path == MESSAGES else chat_body
    # the body object is level 1: {"metadata": <MAX - 1 levels>} is the deepest allowed body;
    # it is fingerprinted by the cache and sent upstream. {"deep": <MAX levels>} is one too many
    status, headers, reply = await raw(
        gw, "POST", path, auth, with_field(make(), "metadata", nested(MAX_JSON_DEPTH - 1))
    )
    assert status == 200, reply
    assert headers["x-tollway-cache"] == "miss"
    for depth in (MAX_JSON_DEPTH, 300, 1000):
        body = with_field(make(), "deep", nested(depth))
        status, headers, reply = await raw(gw, "POST", path, auth, body)
        assert status == 400, (depth, reply)
        assert_error_shape(path, reply)
        assert str(MAX_JSON_DEPTH) in reply["error"]["message"]
        if path == CHAT:
            assert reply["error"]["code"] == "invalid_request"
        row = await usage_row(gw, headers["x-request-id"])
        assert (row["status"], row["error_code"], row["user_id"]) == (
            400,
            "invalid_request",
            "deep",
        )
    assert_no_traceback(logs)


async def test_the_sdks_raise_their_typed_error_for_a_deep_body(gw: Gw) -> None:
    key = await gw.create_key("deep", "pro")
    deep = orjson.loads(nested(300))
    with pytest.raises(openai.BadRequestError, match=f"deeper than {MAX_JSON_DEPTH}") as oai:
        await gw.openai(key).chat.completions.create(
            model="gpt-5.4-mini",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"metadata": deep},
        )
    assert oai.value.response.headers["x-request-id"].startswith("req_")
    with pytest.raises(anthropic.BadRequestError, match=f"deeper than {MAX_JSON_DEPTH}"):
        await gw.anthropic(key).messages.create(
            model="claude-sonnet",
            max_tokens=5,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"metadata": deep},
        )


ODD_BODIES = [
    (
        "huge-int",
        CHAT,
        b'{"model":"gpt-5.4-mini","messages":[],"seed":123456789012345678901234567890}',
    ),
    ("infinity", CHAT, b'{"model":"gpt-5.4-mini","messages":[],"temperature":1e400}'),
    ("nan", MESSAGES, b'{"model":"claude-sonnet","max_tokens":5,"temperature":NaN}'),
    (
        "lone-surrogate",
        CHAT,
        b'{"model":"gpt-5.4-mini","messages":[{"role":"user","content":"\\ud800"}]}',
    ),
    ("lone-surrogate-model", MESSAGES, b'{"model":"claude\\udfff","max_tokens":5,"messages":[]}'),
    ("string-body", CHAT, b'"\\ud800"'),
    ("control-model", CHAT, b'{"model":"gpt\\u0000\\r\\nX-Evil: 1\\u202e","messages":[]}'),
    ("not-utf8-body", MESSAGES, b'{"model":"claude-sonnet","max_tokens":5,"system":"\xff"}'),
]


@pytest.mark.parametrize(
    ("path", "body"), [case[1:] for case in ODD_BODIES], ids=[case[0] for case in ODD_BODIES]
)
async def test_odd_json_values(
    gw: Gw, logs: pytest.LogCaptureFixture, path: str, body: bytes
) -> None:
    key = await gw.create_key("odd", "pro")
    auth = [JSON, (b"Authorization", f"Bearer {key}".encode())]
    status, headers, reply = await raw(gw, "POST", path, auth, body)
    assert 400 <= status < 500, reply
    assert_error_shape(path, reply)
    assert "x-evil" not in headers  # a model name never reaches a response header
    row = await usage_row(gw, headers["x-request-id"])
    assert row["status"] == status
    assert_no_traceback(logs)


async def test_duplicate_keys_mean_the_last_one_for_the_gateway_and_the_provider(
    gw: Gw, emulator: Emulator, logs: pytest.LogCaptureFixture
) -> None:
    """No parser differential: the gateway re-serialises the body it checked, so the provider
    reads the same model the gateway routed and priced."""
    key = await gw.create_key("dup", "pro")
    auth = [JSON, (b"Authorization", f"Bearer {key}".encode())]
    body = b'{"model":"gpt-5.4-mini","model":"claude-sonnet","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
    status, headers, _ = await raw(gw, "POST", CHAT, auth, body)
    assert status == 200
    assert headers["x-tollway-model"] == "claude-sonnet"
    last = await emulator.last()
    assert last["body"]["model"] == "claude-sonnet-5"
    assert_no_traceback(logs)


def test_the_refused_depths_include_what_orjson_reads_but_cannot_write() -> None:
    """Why the limit exists: orjson reads 1024 levels but writes about 254, so the 300 and 1000
    levels above parsed and then failed where the body was written again (fingerprint,
    upstream request): a 500 before the check."""
    for depth in (300, 1000):
        deep = orjson.loads(nested(depth))
        with pytest.raises(TypeError):
            orjson.dumps(deep)
    # the limit leaves room for the levels a fingerprint or a translation wraps around a body
    assert orjson.dumps([[orjson.loads(nested(MAX_JSON_DEPTH + 8))]])
