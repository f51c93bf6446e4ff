"""Random bodies and headers at every endpoint of a real `tollway serve`: never a 500, never a
stack trace, every error in the route's provider shape, and the server stays up."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import free_port
from tests.procs import TOLLWAY, running


class Http:
    """A tiny keep-alive HTTP client on the standard library (one connection, reopened on error)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def post(
        self, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        return self.request("POST", path, body, headers)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        try:
            self.conn.request(method, path, body=body, headers=headers or {})
            r = self.conn.getresponse()
            data = r.read()
        except (http.client.HTTPException, ConnectionError):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            raise
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data

    def close(self) -> None:
        self.conn.close()


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
        status, _, made = client.post(
            "/admin/keys",
            json.dumps({"user": "fuzz", "tier": "pro"}).encode(),
            {"Authorization": "Bearer fuzz-admin", "Content-Type": "application/json"},
        )
        assert status == 201
        yield client, json.loads(made)["key"]
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

bodies = st.one_of(
    plausible.map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
)

header_sets = st.fixed_dictionaries(
    {},
    optional={
        "content-type": st.sampled_from(
            [
                "application/json",
                "text/plain",
                "application/json; charset=utf-8",
                "",
                "multipart/form-data",
            ]
        ),
        "x-tollway-feature": st.text(
            alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=20
        ),
        "anthropic-version": st.sampled_from(["2023-06-01", "garbage"]),
        "x-forwarded-for": st.sampled_from(["1.2.3.4", "not-an-ip, 5.6.7.8", ""]),
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    body=bodies,
    headers=header_sets,
    auth=st.sampled_from(["good", "bad", "none", "x-api-key"]),
)
def test_random_requests_never_500(
    gateway: tuple[Http, str], endpoint: str, body: bytes, headers: dict[str, str], auth: str
) -> None:
    http, key = gateway
    h = dict(headers)
    if auth == "good":
        h["authorization"] = f"Bearer {key}"
    elif auth == "bad":
        h["authorization"] = "Bearer tw_wrong"
    elif auth == "x-api-key":
        h["x-api-key"] = key
    status, rh, content = http.post(endpoint, body, h)
    event(f"status {status}")
    assert status < 500 or status in (502, 504), content
    assert b"Traceback" not in content
    ctype = rh.get("content-type", "")
    if status >= 400:
        err = json.loads(content)
        if endpoint == "/v1/messages":
            assert err["type"] == "error" and {"type", "message"} <= set(err["error"])
        else:
            assert {"message", "type", "param", "code"} <= set(err["error"])
    else:
        assert ctype.startswith(("application/json", "text/event-stream"))


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
