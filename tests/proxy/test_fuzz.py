"""Random bodies and headers at every endpoint of a real `tollway serve`: never a 500, never a
stack trace, every error in the route's provider shape, and the server stays up.

Headers carry random bytes (credentials, feature, anthropic-version, content-type,
content-encoding), bodies come plain, compressed or mislabelled, and nested up to 2,000 levels.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from proxy.edge import MAX_JSON_DEPTH
from tests.conftest import free_port
from tests.procs import TOLLWAY, Http, running

ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages"]
MODELS = ["gpt-5.4-mini", "claude-sonnet", "text-embedding-3-small", "auto", "nope", "", 3, None]

POLICY = """\
version: 1
listen: {{host: 127.0.0.1, port: {port}, max_body_bytes: 65536}}
admin: {{key: fuzz-admin}}
state: {{dir: null}}
providers:
  openai: {{kind: openai, base_url: "http://127.0.0.1:{emu}/v1", api_key: k,
           timeout: {{read: 3s}}, retries: {{attempts: 0}}}}
  anthropic: {{kind: anthropic, base_url: "http://127.0.0.1:{emu}", api_key: k,
              timeout: {{read: 3s}}, retries: {{attempts: 0}}}}
models:
  gpt-5.4-mini: {{provider: openai}}
  claude-sonnet: {{provider: anthropic}}
  text-embedding-3-small: {{provider: openai}}
features:
  basic_suggestions: {{price_per_request: 0.01}}
  code_suggestions: {{price_per_request: 0.02}}
tiers:
  pro: {{features: [basic_suggestions, code_suggestions]}}
chain:
  - name: auth
  - name: limits
    config: {{user: [100000/minute], ip: [100000/minute], global: {{concurrent_requests: 50}}}}
  - name: privacy
  - name: routing
    config: {{auto: {{cheap: gpt-5.4-mini, strong: claude-sonnet}},
              fallbacks: {{gpt-5.4-mini: [claude-sonnet]}}}}
  - name: cache
    config: {{default_ttl: 1h}}
  - name: batching
    config: {{window: 5ms}}
  - name: metering
    config: {{database: "{db}"}}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Http, str]]:
    emu, port = free_port(), free_port()
    policy: Path = tmp_path_factory.mktemp("fuzz") / "policy.yaml"
    policy.write_text(POLICY.format(port=port, emu=emu, db=policy.parent / "usage.duckdb"))
    with (
        running([*TOLLWAY, "emulator", "--port", str(emu)], "emulator listening"),
        running([*TOLLWAY, "serve", "--policy", str(policy)], "tollway listening") as gw,
    ):
        client = Http(port)
        yield client, client.create_key("fuzz-admin", "fuzz", "pro")
        client.close()
        assert "Traceback" not in gw.text()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system", "tool", "bogus", 7]),
            "content": st.one_of(st.text(max_size=30), json_values),
        }
    ),
    max_size=3,
)

plausible = st.fixed_dictionaries(
    {"model": st.sampled_from(MODELS)},
    optional={
        "messages": st.one_of(messages, json_values),
        "max_tokens": st.one_of(st.integers(-5, 50), json_values),
        "stream": st.one_of(st.booleans(), json_values),
        "stream_options": json_values,
        "input": st.one_of(
            st.text(max_size=20), st.lists(st.text(max_size=10), max_size=3), json_values
        ),
        "prompt": json_values,
        "tools": json_values,
        "system": json_values,
        "temperature": json_values,
    },
)


def nested(depth: int) -> bytes:
    """JSON text nested ``depth`` levels deep (arrays and objects alternating), written by hand:
    json and orjson refuse to write so deep."""
    value = b"1"
    for level in range(depth):
        value = b'{"k":' + value + b"}" if level % 2 else b"[" + value + b"]"
    return value


def with_field(fields: dict[str, object], name: str, value: bytes) -> bytes:
    """The JSON object ``fields`` (not empty) with one more field of ready JSON text."""
    fields = {k: v for k, v in fields.items() if k != name}
    return json.dumps(fields).encode()[:-1] + b', "' + name.encode() + b'": ' + value + b"}"


DEEP_FIELDS = ["messages", "metadata", "tools", "input", "x"]

bodies = st.one_of(
    plausible.map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.builds(
        with_field, plausible, st.sampled_from(DEEP_FIELDS), st.integers(1, 2000).map(nested)
    ),
)

# a header value of random bytes: any byte but CR and LF (which would end the header line);
# bytes that are not UTF-8 must be refused in the API's shape, control bytes by the HTTP parser
header_bytes = st.binary(max_size=24).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))

header_sets = st.fixed_dictionaries(
    {},
    optional={
        "content-type": st.one_of(
            st.sampled_from(
                [
                    "application/json",
                    "text/plain",
                    "application/json; charset=utf-8",
                    "",
                    "multipart/form-data",
                ]
            ),
            header_bytes,
        ),
        "x-tollway-feature": st.one_of(
            st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=20),
            header_bytes,
        ),
        "anthropic-version": st.one_of(st.sampled_from(["2023-06-01", "garbage"]), header_bytes),
        "x-forwarded-for": st.sampled_from(["1.2.3.4", "not-an-ip, 5.6.7.8", ""]),
        # a label alone: the body is not encoded (see `encodings` for bodies that are)
        "content-encoding": st.one_of(
            st.sampled_from(["gzip", "deflate", "br", "identity", "x-gzip", "gzip, gzip", ""]),
            header_bytes,
        ),
    },
)


def encode(body: bytes, how: str) -> tuple[bytes, str]:
    """``body`` compressed (or damaged) as ``how`` says; with the Content-Encoding to send."""
    if how == "gzip":
        return gzip.compress(body), "gzip"
    if how == "deflate":
        return zlib.compress(body), "deflate"
    if how == "raw-deflate":  # deflate without the zlib wrapper, as some clients send it
        c = zlib.compressobj(wbits=-15)
        return c.compress(body) + c.flush(), "deflate"
    if how == "truncated":
        return gzip.compress(body)[:-9], "gzip"
    if how == "twice":
        return gzip.compress(gzip.compress(body)), "gzip"
    if how == "both":
        return zlib.compress(gzip.compress(body)), "gzip, deflate"
    return body, how  # garbage labelled gzip/deflate: the body as it is


encodings = st.one_of(
    st.none(),
    st.sampled_from(["gzip", "deflate", "raw-deflate", "truncated", "twice", "both"]),
    st.sampled_from(["gzip", "deflate"]).map(lambda e: "garbage-" + e),
)

auths = st.one_of(
    st.sampled_from(["good", "bad", "none", "x-api-key"]),
    st.tuples(st.sampled_from(["authorization", "x-api-key"]), header_bytes),
)


MALFORMED = "malformed HTTP request"
"""The message of a request the HTTP parser refused (proxy/server.py): it fails before the
request line is known, so the dialect cannot be chosen and OpenAI's shape is used."""


def assert_error_shape(endpoint: str, content: bytes) -> None:
    err = json.loads(content)
    openai_shape = isinstance(err.get("error"), dict) and {
        "message",
        "type",
        "param",
        "code",
    } <= set(err["error"])
    if endpoint == "/v1/messages" and not (openai_shape and err["error"]["message"] == MALFORMED):
        assert err["type"] == "error" and {"type", "message"} <= set(err["error"]), err
    else:
        assert openai_shape, err


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    body=bodies,
    headers=header_sets,
    auth=auths,
    encoding=encodings,
)
def test_random_requests_never_500(
    gateway: tuple[Http, str],
    endpoint: str,
    body: bytes,
    headers: dict[str, str | bytes],
    auth: str | tuple[str, bytes],
    encoding: str | None,
) -> None:
    http, key = gateway
    h = dict(headers)
    if auth == "good":
        h["authorization"] = f"Bearer {key}"
    elif auth == "bad":
        h["authorization"] = "Bearer tw_wrong"
    elif auth == "x-api-key":
        h["x-api-key"] = key
    elif isinstance(auth, tuple):
        name, value = auth
        h[name] = b"Bearer " + value if name == "authorization" else value
    if encoding is not None:
        body, h["content-encoding"] = encode(body, encoding.removeprefix("garbage-"))
        event(f"encoding {encoding}")
    status, rh, content = http.post(endpoint, body, h)
    event(f"status {status}")
    assert status < 500 or status in (502, 504), content
    assert b"Traceback" not in content
    ctype = rh.get("content-type", "")
    if status >= 400:
        assert_error_shape(endpoint, content)
    else:
        assert ctype.startswith(("application/json", "text/event-stream"))


ORJSON_PARSE_DEPTH = 1024
"""The deepest nesting orjson.loads accepts."""

MODEL_OF = {
    "/v1/chat/completions": "gpt-5.4-mini",
    "/v1/completions": "gpt-5.4-mini",
    "/v1/embeddings": "text-embedding-3-small",
    "/v1/messages": "claude-sonnet",
}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    field=st.sampled_from(DEEP_FIELDS),
    depth=st.integers(1, 2000),
)
@example(endpoint="/v1/chat/completions", field="metadata", depth=MAX_JSON_DEPTH - 1)
@example(endpoint="/v1/messages", field="metadata", depth=MAX_JSON_DEPTH)
@example(endpoint="/v1/chat/completions", field="x", depth=ORJSON_PARSE_DEPTH - 1)
@example(endpoint="/v1/embeddings", field="x", depth=ORJSON_PARSE_DEPTH)
def test_nesting_depth(gateway: tuple[Http, str], endpoint: str, field: str, depth: int) -> None:
    """A body nested deeper than MAX_JSON_DEPTH (the body object is level 1) is a 400 that
    names the limit; any shallower one is not refused for its depth."""
    http, key = gateway
    fields = {"model": MODEL_OF[endpoint], "max_tokens": 5, "input": "x", "prompt": "x"}
    body = with_field(fields, field, nested(depth))
    h = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    status, _, content = http.post(endpoint, body, h)
    event(f"status {status}")
    assert status < 500 or status in (502, 504), content
    if status >= 400:
        assert_error_shape(endpoint, content)
    refused = status == 400 and b"deeper than" in content
    if 1 + depth > ORJSON_PARSE_DEPTH:  # the parser refuses first
        assert status == 400 and b"depth limit exceeded" in content, content
    elif 1 + depth > MAX_JSON_DEPTH:  # parsed, then refused by the gateway's own limit
        assert refused, content
    else:
        assert not refused, content


def test_still_up_after_fuzzing(gateway: tuple[Http, str]) -> None:
    http, key = gateway
    assert json.loads(http.request("GET", "/healthz")[2]) == {"status": "ok"}
    body = {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "ok?"}]}
    status, _, _ = http.post(
        "/v1/chat/completions",
        json.dumps(body).encode(),
        {"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    assert status == 200
