"""Client-controlled provider headers: a tenant cannot act on the operator's provider account.

OpenAI-Organization, OpenAI-Project, OpenAI-Beta, anthropic-beta (and every other ``openai-*``
/ ``anthropic-*`` header but anthropic-version) pick the organisation, project, beta features
and so the bill of the operator's provider account. They reach the provider only where the
policy lists them in ``providers.X.forward_headers``. The emulator reports the headers of the
last request it received.
"""

from __future__ import annotations

from typing import Any

import pytest

from proxy.policy import PolicyError, load_text
from tests.conftest import ADMIN_KEY, Emulator, Gw

ACCOUNT = {
    "OpenAI-Organization": "org-someone-else",
    "OpenAI-Project": "proj-someone-else",
    "OpenAI-Beta": "assistants=v2",
}

POLICY = """
version: 1
admin: {{key: {admin}}}
state: {{dir: null}}
providers:
  openai: {{kind: openai, base_url: "{emu}/v1", api_key: upstream-secret{openai_extra}}}
  anthropic: {{kind: anthropic, base_url: "{emu}", api_key: upstream-secret{anthropic_extra}}}
models:
  gpt-5.4-mini: {{provider: openai}}
  claude-sonnet: {{provider: anthropic, upstream_model: claude-sonnet-5}}
chain:
  - name: auth
"""


def _policy(openai_allows: str = "", anthropic_allows: str = "") -> str:
    """POLICY with ``forward_headers`` lists; the braces stay for make_gateway's format()."""
    return POLICY.replace(
        "{openai_extra}", f", forward_headers: [{openai_allows}]" if openai_allows else ""
    ).replace(
        "{anthropic_extra}",
        f", forward_headers: [{anthropic_allows}]" if anthropic_allows else "",
    )


async def _chat(gw: Gw, key: str, headers: dict[str, str]) -> None:
    client = gw.openai(key, default_headers=headers)
    reply = await client.chat.completions.create(
        model="gpt-5.4-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content


async def _message(gw: Gw, key: str, headers: dict[str, str]) -> None:
    client = gw.anthropic(key, default_headers=headers)
    reply = await client.messages.create(
        model="claude-sonnet", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.content


async def test_account_headers_are_dropped_by_default(
    make_gateway: Any, emulator: Emulator
) -> None:
    gw = await make_gateway("", base=_policy())
    key = await gw.create_key()
    await _chat(gw, key, {**ACCOUNT, "X-Trace": "t-1", "Idempotency-Key": "idem-1"})
    seen = (await emulator.last())["headers"]
    # the request did carry client headers to the provider (the path is not trivially empty)
    assert seen["x-trace"] == "t-1" and seen["idempotency-key"] == "idem-1"
    assert seen["authorization"] == "Bearer upstream-secret"  # the operator's key, not the client's
    for name in ACCOUNT:
        assert name.lower() not in seen, name

    await _message(gw, key, {"anthropic-beta": "context-1m-2025-08-07", "X-Trace": "t-2"})
    seen = (await emulator.last())["headers"]
    assert seen["x-trace"] == "t-2"
    assert "anthropic-version" in seen  # the API version is not an account header: it passes
    assert "anthropic-beta" not in seen

    # an OpenAI client naming an Anthropic model: its OpenAI account headers are dropped too
    client = gw.openai(key, default_headers=ACCOUNT)
    await client.chat.completions.create(
        model="claude-sonnet", messages=[{"role": "user", "content": "hi"}]
    )
    last = await emulator.last()
    assert last["path"] == "/v1/messages"
    assert not {n.lower() for n in ACCOUNT} & set(last["headers"])


async def test_headers_the_policy_allows_pass_and_only_those(
    make_gateway: Any, emulator: Emulator
) -> None:
    gw = await make_gateway(
        "", base=_policy(openai_allows="OpenAI-Project", anthropic_allows="anthropic-beta")
    )
    key = await gw.create_key()
    await _chat(gw, key, ACCOUNT)
    seen = (await emulator.last())["headers"]
    assert seen["openai-project"] == "proj-someone-else"
    assert "openai-organization" not in seen and "openai-beta" not in seen

    await _message(gw, key, {"anthropic-beta": "context-1m-2025-08-07"})
    seen = (await emulator.last())["headers"]
    assert seen["anthropic-beta"] == "context-1m-2025-08-07"


@pytest.mark.parametrize(
    "name", ["Authorization", "x-api-key", "Content-Encoding", "Host", "X-Tollway-Feature", "a b"]
)
def test_credentials_and_framing_can_never_be_allowed(name: str) -> None:
    text = _policy(openai_allows=f'"{name}"').format(admin=ADMIN_KEY, emu="http://127.0.0.1:1")
    with pytest.raises(PolicyError) as info:
        load_text(text)
    (error,) = info.value.errors
    assert error.startswith("providers.openai.forward_headers") and "line" in error, error
