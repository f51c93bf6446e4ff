"""Helpers several attack families share: a policy for `tollway serve` with one static key."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.conftest import free_port

_STATIC_KEY_POLICY = """\
version: 1
listen: {{host: 127.0.0.1, port: {port}{listen}}}
state: {{dir: null}}
providers:
  openai: {{kind: openai, base_url: "{upstream}", api_key: k}}
models:
  gpt-5.4-mini: {{provider: openai}}
tiers:
  pro: {{}}
chain:
  - name: auth
    config:
      keys: [{{id: k1, user: alice, tier: pro, sha256: {sha}}}]
"""


def static_key_policy(
    folder: Path, key: str, upstream: str = "http://127.0.0.1:1/v1", **listen: str
) -> tuple[Path, int]:
    """A policy file for `tollway serve` on a free port: one OpenAI model at ``upstream``, the
    auth plugin with the one key ``key`` (user alice, plan pro), ``listen`` settings added.
    Returns the file and the port."""
    port = free_port()
    extra = "".join(f", {name}: {value}" for name, value in listen.items())
    sha = hashlib.sha256(key.encode()).hexdigest()
    path = folder / f"policy-{port}.yaml"
    path.write_text(_STATIC_KEY_POLICY.format(port=port, listen=extra, upstream=upstream, sha=sha))
    return path, port
