"""policies.yaml: strict validation with path + line errors, secrets, durations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.chain import compile_chain
from proxy.policy import PolicyError, load_file, load_text, parse_duration

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = """\
version: 1
providers:
  openai: {kind: openai, base_url: "http://127.0.0.1:1/v1", api_key: k}
models:
  m: {provider: openai}
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        loaded = load_text(text)
        compile_chain(loaded)
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
