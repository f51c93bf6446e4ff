"""policies.yaml: strict validation with path + line errors, secrets, durations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.chain import compile_chain
from proxy.policy import PolicyError, load_file, load_text, parse_duration, read_text

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = """\
version: 1
providers:
  openai: {kind: openai, base_url: "http://127.0.0.1:1/v1", api_key: k}
models:
  m: {provider: openai}
"""


def errors_of(text: str) -> list[str]:
    """Every error of the policy text, the way `tollway check` and a reload find them."""
    with pytest.raises(PolicyError) as info:
        compile_chain(read_text(text))
    return info.value.errors


def test_shipped_policies_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLWAY_ADMIN_KEY", "a")
    monkeypatch.setenv("OPENAI_API_KEY", "b")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "c")
    for name in ("policies.yaml", "policies.demo.yaml"):
        loaded = load_file(ROOT / name)
        chain = compile_chain(loaded)
        assert "auth" in chain.names
        assert loaded.policy.tiers["free"].requests_per_minute == 5
        assert loaded.policy.tiers["pro"].requests_per_month == 25000
        assert loaded.policy.tiers["enterprise"].requests_per_month == "unlimited"


def test_unknown_top_level_key_names_line() -> None:
    errs = errors_of(MINIMAL + "listen: {port: 8080}\nlimts: {}\n")
    assert errs == ["limts: unknown key (line 7)"]


def test_nested_error_path_and_line() -> None:
    text = MINIMAL + "listen:\n  host: 0.0.0.0\n  port: 99999\n"
    errs = errors_of(text)
    assert len(errs) == 1
    assert errs[0].startswith("listen.port: ")
    assert errs[0].endswith("(line 8)")


def test_plugin_config_error_names_chain_index_and_plugin() -> None:
    text = (
        MINIMAL
        + "chain:\n  - name: auth\n    config:\n      keys:\n        - {id: k1, user: u, tier: t, sha256: nothex}\n"
    )
    errs = errors_of(text)
    assert len(errs) == 1
    assert errs[0].startswith("chain[0] (auth).config.keys[0].sha256: ")
    assert errs[0].endswith("(line 10)")


def test_unknown_plugin_is_refused() -> None:
    errs = errors_of(MINIMAL + "chain:\n  - name: auth\n  - name: nosuchplugin\n")
    assert errs[0].startswith("chain[1] (nosuchplugin): unknown plugin 'nosuchplugin'")


def test_model_with_unknown_provider() -> None:
    errs = errors_of(MINIMAL + "  other: {provider: nope}\n")
    assert any("unknown provider 'nope'" in e for e in errs)


def test_env_and_file_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TW_TEST_ADMIN", "from-env")
    (tmp_path / "key.txt").write_text("from-file\n")
    text = (
        MINIMAL.replace("api_key: k", "api_key: {$file: key.txt}")
        + "admin: {key: {$env: TW_TEST_ADMIN}}\n"
    )
    loaded = load_text(text, base=tmp_path)
    assert loaded.policy.admin.key is not None
    assert loaded.policy.admin.key.get_secret_value() == "from-env"
    assert loaded.policy.providers["openai"].api_key.get_secret_value() == "from-file"  # type: ignore[union-attr]
    # secrets never show in the model's repr (and so never in logs of it)
    assert "from-env" not in repr(loaded.policy)


def test_missing_secret_is_an_error_with_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TW_TEST_MISSING", raising=False)
    errs = errors_of(MINIMAL + "admin: {key: {$env: TW_TEST_MISSING}}\n")
    assert errs == ["admin.key (line 6): environment variable TW_TEST_MISSING is not set"]


def test_invalid_yaml_reports_line() -> None:
    errs = errors_of("version: 1\nproviders: [\n")
    assert errs[0].startswith("invalid YAML (line")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(30, 30.0), ("100ms", 0.1), ("1h", 3600.0), ("7d", 604800.0), ("2.5s", 2.5)],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


def test_bad_duration_is_reported() -> None:
    text = MINIMAL.replace("api_key: k", "api_key: k, timeout: {read: soon}")
    errs = errors_of(text)
    assert len(errs) == 1 and errs[0].startswith("providers.openai.timeout.read: ")


def test_trusted_proxies_must_be_networks() -> None:
    errs = errors_of(MINIMAL + "listen: {trusted_proxies: [10.0.0.0/8, not-an-ip]}\n")
    assert errs[0].startswith("listen.trusted_proxies: ")


def test_check_command_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(MINIMAL + "chain:\n  - name: auth\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL + "chain:\n  - name: auth\n    config: {kyes: []}\n")
    ok = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "check", str(good)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout
    ko = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "check", str(bad)], capture_output=True, text=True
    )
    assert ko.returncode == 1
    assert "chain[0] (auth).config.kyes: unknown key (line 8)" in ko.stderr
    assert "Traceback" not in ko.stderr


def test_one_error_per_path_without_pydantic_prefixes() -> None:
    # a value that fits no member of a union: one line for the path, not one per member
    errs = errors_of(MINIMAL + "tiers:\n  free: {requests_per_month: lots}\n")
    assert len(errs) == 1
    assert errs[0].startswith("tiers.free.requests_per_month: Input should be a valid integer")
    assert "'unlimited'" in errs[0] and errs[0].endswith("(line 7)")
    # a ValueError raised by a validator reads as its own message
    errs = errors_of(MINIMAL + "listen: {trusted_proxies: [not-an-ip]}\n")
    assert errs[0].startswith("listen.trusted_proxies: ") and "Value error" not in errs[0]


def test_top_level_and_chain_errors_come_together() -> None:
    text = MINIMAL + "limts: {}\nchain:\n  - name: auth\n    config: {kyes: []}\n"
    assert errors_of(text) == [
        "limts: unknown key (line 6)",
        "chain[0] (auth).config.kyes: unknown key (line 9)",
    ]


def test_an_invalid_entry_is_not_reported_again_where_it_is_named() -> None:
    text = MINIMAL.replace("kind: openai", "kind: openia") + (
        "tiers:\n  free: {requests_per_minute: 0}\n  pro: {includes: free}\n"
    )
    errs = errors_of(text)
    assert [e.split(":")[0] for e in errs] == [
        "providers.openai.kind",
        "tiers.free.requests_per_minute",
    ]


def test_cross_references_of_plugin_configs_have_paths_and_lines() -> None:
    text = MINIMAL + (
        "tiers: {pro: {}}\n"
        "chain:\n"
        "  - name: auth\n"
        "    config:\n"
        "      keys:\n"
        f"        - {{id: k1, user: u, tier: gold, sha256: {'a' * 64}}}\n"
        "  - name: routing\n"
        "    config:\n"
        "      fallbacks: {m: [m, gone]}\n"
    )
    assert errors_of(text) == [
        "chain[0] (auth).config.keys[0].tier: unknown tier 'gold' (line 11)",
        "chain[1] (routing).config.fallbacks.m: a model cannot be its own fallback; "
        "unknown model 'gone' (not in models:) (line 14)",
    ]


def test_dead_and_test_only_keys_are_gone() -> None:
    """features.*.cache was read by nothing; limits' plan_period only shortened tests."""
    errs = errors_of(MINIMAL + "features: {basic: {price_per_request: 0, cache: false}}\n")
    assert errs == ["features.basic.cache: unknown key (line 6)"]
    errs = errors_of(MINIMAL + "chain:\n  - name: limits\n    config: {plan_period: 1s}\n")
    assert errs == ["chain[0] (limits).config.plan_period: unknown key (line 8)"]


def test_a_policy_read_with_errors_is_never_loaded() -> None:
    loaded = read_text(MINIMAL + "limts: {}\n")
    assert loaded.errors == ["limts: unknown key (line 6)"]
    with pytest.raises(PolicyError):
        load_text(MINIMAL + "limts: {}\n")


def test_what_is_valid_of_a_broken_section_is_used_to_check_the_rest() -> None:
    # state.url is kept though state has an error: sink redis is fine, a keyless cache is not
    text = MINIMAL.replace("m: {provider: openai}", "m: {provider: nope, input_per_mtok: -1}") + (
        "state: {url: 'redis://127.0.0.1:1/0', on_unavailable: bogus}\n"
        "chain:\n"
        "  - name: metering\n    config: {sink: redis}\n"
        "  - name: cache\n    config: {backend: state}\n"
    )
    assert [e.split(":")[0] for e in errors_of(text)] == [
        "models.m.input_per_mtok",
        "models.m.provider",
        "state.on_unavailable",
        "chain[1] (cache).config.backend",
    ]
