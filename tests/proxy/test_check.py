"""`tollway check`: every error of a file in one run, each with its path and line.

The real command runs as a subprocess (tests/procs.py), the way an operator or CI runs it:
errors of every section and of every plugin's config, cross-references included, come out
together, and a machine without the policy's secrets can still check it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from proxy.chain import compile_chain
from proxy.policy import PolicyError, read_text
from tests.procs import ROOT, TOLLWAY

# Ten planted mistakes, one per kind, across the sections and the chain (the line each
# is on is in the expected message). `anthropic` has an invalid kind: the models and the
# fallbacks that name it must not be reported again as naming an unknown provider or model.
TEN_MISTAKES = """\
version: 1
listen: {host: 127.0.0.1, port: 8080}
limts: {}
providers:
  openai: {kind: openai, base_url: "http://127.0.0.1:1/v1", api_key: {$env: TW_CHECK_OPENAI}}
  anthropic: {kind: antropic, base_url: "http://127.0.0.1:1"}
models:
  gpt-5.4-mini: {provider: openai}
  gpt-5.5: {provider: openai}
  claude-sonnet: {provider: anthropic}
  mistral: {provider: mistal}
features:
  basic_suggestions: {price_per_request: 0.01}
tiers:
  free: {requests_per_minute: 5, features: [basic_suggestions]}
  pro: {includes: fre, requests_per_minute: 30}
chain:
  - name: auth
  - name: limits
    config: {user: [60/minute, lots]}
  - name: routing
    config:
      auto: {cheap: gpt-5.4-mini, strong: gpt-6}
      fallbacks: {gpt-5.5: [claude-sonnet]}
  - name: bacthing
  - name: privacy
    config: {custom: [{name: email, pattern: 'mail:\\S+'}]}
  - name: cache
    config: {ttl: {basic_suggestions: 1h}, default_ttl: soon}
  - name: metering
    config: {databse: data/usage.duckdb}
"""

EXPECTED = [
    "limts: unknown key (line 3)",
    "providers.anthropic.kind: Input should be 'openai' or 'anthropic' (line 6)",
    "models.mistral.provider: unknown provider 'mistal' (line 11)",
    "tiers.pro.includes: unknown tier 'fre' (line 16)",
    "chain[1] (limits).config.user[1]: 'lots' is not a limit such as '60/minute' or "
    "'5 per 2 second' (line 20)",
    "chain[2] (routing).config.auto.strong: unknown model 'gpt-6' (not in models:) (line 23)",
    "chain[3] (bacthing): unknown plugin 'bacthing' (known: ",
    "chain[4] (privacy).config.custom[0].name: detector name 'email' is used twice (or is a "
    "built-in's) (line 27)",
    "chain[5] (cache).config.default_ttl: 'soon' is not a duration such as 100ms, 30s, 1h "
    "or 7d (line 29)",
    "chain[6] (metering).config.databse: unknown key (line 31)",
]


def check(path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`tollway check` as a subprocess, without the secrets the test policies name."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TW_CHECK_")}
    return subprocess.run(
        [*TOLLWAY, "check", *args, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**environ, **env},
    )


def reported(stderr: str) -> list[str]:
    """The error lines (indented, not warnings) of the command's output."""
    return [
        line.strip()
        for line in stderr.splitlines()
        if line.startswith("  ") and not line.strip().startswith("warning: ")
    ]


@pytest.fixture
def ten(tmp_path: Path) -> Path:
    path = tmp_path / "ten.yaml"
    path.write_text(TEN_MISTAKES)
    return path


def test_ten_mistakes_in_one_run_each_with_its_line(ten: Path) -> None:
    res = check(ten)
    assert res.returncode == 1
    assert res.stderr.startswith(f"{ten}: invalid policy\n")
    errors = reported(res.stderr)
    assert len(errors) == 10, res.stderr
    for got, want in zip(errors, EXPECTED, strict=True):
        assert got.startswith(want), (got, want)
    assert errors[6].endswith(" (line 25)")  # the unknown plugin, on its `- name:` line
    # the one secret it names is not set here: a warning, not one of the ten
    assert res.stderr.count("  warning: ") == 1
    assert "warning: providers.openai.api_key (line 5): environment variable" in res.stderr
    assert "Traceback" not in res.stderr


def test_no_error_carries_pydantic_prefixes(ten: Path) -> None:
    res = check(ten)
    assert "Value error" not in res.stderr and "Assertion failed" not in res.stderr


def test_missing_secret_is_a_warning_then_strict_makes_it_an_error(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\n"
        "admin: {key: {$env: TW_CHECK_ADMIN}}\n"
        "providers:\n"
        "  openai: {kind: openai, base_url: 'http://x/v1', api_key: {$file: nokey.txt}}\n"
        "models: {m: {provider: openai}}\n"
        "chain:\n  - name: auth\n"
    )
    res = check(path)
    assert res.returncode == 0, res.stderr
    assert "ok (1 models, chain: auth, 2 secrets not set here)" in res.stdout
    assert res.stderr.splitlines() == [
        "  warning: admin.key (line 2): environment variable TW_CHECK_ADMIN is not set",
        "  warning: providers.openai.api_key (line 4): cannot read secret file nokey.txt: "
        "No such file or directory",
    ]
    strict = check(path, "--strict")
    assert strict.returncode == 1
    assert "  admin.key (line 2): environment variable TW_CHECK_ADMIN is not set" in strict.stderr
    assert check(path, TW_CHECK_ADMIN="a").stderr.count("warning: ") == 1


def test_a_missing_secret_is_not_checked_as_a_wrong_value(tmp_path: Path) -> None:
    """An unset cache key is checked as present (a shared backend needs one) and not parsed;
    the plugin is not built with a stand-in key."""
    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\nstate: {url: 'redis://127.0.0.1:1/0'}\n"
        "providers: {openai: {kind: openai, base_url: 'http://x/v1'}}\n"
        "models: {m: {provider: openai}}\n"
        "chain:\n  - name: cache\n"
        "    config: {backend: state, key: {$env: TW_CHECK_CACHE}, old_keys: [{$env: TW_CHECK_OLD}]}\n"
    )
    res = check(path)
    assert res.returncode == 0, res.stderr
    assert "chain: cache, 2 secrets not set here" in res.stdout
    assert "warning: chain[0] (cache).config.key (line 7): environment variable" in res.stderr
    assert "warning: chain[0] (cache).config.old_keys[0] (line 7):" in res.stderr


def test_serve_refuses_to_start_without_its_secrets(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\nadmin: {key: {$env: TW_CHECK_ADMIN}}\nlimts: {}\nchain:\n  - name: nosuch\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TW_CHECK_")}
    res = subprocess.run(
        [*TOLLWAY, "serve", "--policy", str(path), "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=environ,
    )
    assert res.returncode == 1
    errors = reported(res.stderr)
    assert errors[:2] == [
        "admin.key (line 2): environment variable TW_CHECK_ADMIN is not set",
        "limts: unknown key (line 3)",
    ]
    assert errors[2].startswith("chain[0] (nosuch): unknown plugin 'nosuch'")
    assert "listening" not in res.stdout


def test_reload_and_compile_report_every_error_at_once() -> None:
    """What `tollway check` prints is what a reload refuses with (read, then compile)."""
    loaded = read_text(TEN_MISTAKES.replace("{$env: TW_CHECK_OPENAI}", "k"))
    with pytest.raises(PolicyError) as info:
        compile_chain(loaded)
    assert len(info.value.errors) == 10
    for got, want in zip(info.value.errors, EXPECTED, strict=True):
        assert got.startswith(want), (got, want)
