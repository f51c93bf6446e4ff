"""The `tollway` command end to end: serve + SIGHUP reload, keys, and the `make run` demo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import free_port
from tests.procs import ROOT, TOLLWAY, Proc, running

POLICY = """\
version: 1
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{key: {{$env: TOLLWAY_ADMIN_KEY}}}}
state: {{dir: {state}}}
providers:
  openai: {{kind: openai, base_url: "http://127.0.0.1:{emu}/v1", api_key: k}}
models:
  gpt-5.4-mini: {{provider: openai}}
tiers:
  pro: {{requests_per_minute: 30}}
chain:
  - name: auth
"""


def serve_once(policy: Path) -> subprocess.CompletedProcess[str]:
    """`tollway serve` with a policy that is expected to stop it at start-up."""
    return subprocess.run(
        [*TOLLWAY, "serve", "--policy", str(policy)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "TOLLWAY_ADMIN_KEY": "x"},
    )


@pytest.fixture(scope="module")
def emulator_port() -> Iterator[int]:
    port = free_port()
    with running([*TOLLWAY, "emulator", "--port", str(port)], "emulator listening"):
        yield port


def test_serve_keys_and_sighup_reload(emulator_port: int, tmp_path: Path) -> None:
    port = free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(port=port, emu=emulator_port, state=tmp_path / "state"))
    env = {"TOLLWAY_ADMIN_KEY": "cli-admin"}
    with running([*TOLLWAY, "serve", "--policy", str(policy)], "tollway listening", env) as gw:
        url = f"http://127.0.0.1:{port}"
        made = subprocess.run(
            [*TOLLWAY, "keys", "--url", url, "create", "--user", "bob", "--tier", "pro", "-q"],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        key = made.stdout.strip()
        assert key.startswith("tw_")
        # stored hashed only: the secret is nowhere in the state folder
        state = (tmp_path / "state" / "keys.json").read_text()
        assert key not in state and "bob" in state

        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        reply = client.chat.completions.create(
            model="gpt-5.4-mini", messages=[{"role": "user", "content": "hi cli"}]
        )
        assert "hi cli" in (reply.choices[0].message.content or "")

        policy.write_text(
            policy.read_text().replace("models:\n", "models:\n  gpt-5.5: {provider: openai}\n")
        )
        gw.popen.send_signal(signal.SIGHUP)
        gw.wait_for("policy reloaded")
        assert "gpt-5.5" in [m.id for m in client.models.list()]

        policy.write_text(policy.read_text() + "surprise: true\n")
        gw.popen.send_signal(signal.SIGHUP)
        gw.wait_for("reload refused")
        gw.wait_for(r"surprise: unknown key \(line 14\)")
        assert "gpt-5.5" in [m.id for m in client.models.list()]  # still serving the old one

        listed = subprocess.run(
            [*TOLLWAY, "keys", "--url", url, "list"],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        key_id = listed.stdout.split()[0]
        subprocess.run(
            [*TOLLWAY, "keys", "--url", url, "revoke", key_id],
            cwd=ROOT,
            env={**os.environ, **env},
            check=True,
            capture_output=True,
        )
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        client.close()

        subprocess.run(
            [*TOLLWAY, "keys", "--url", url, "create", "--user", "zoe", "--tier", "pro", "-q"],
            cwd=ROOT,
            env={**os.environ, **env},
            check=True,
            capture_output=True,
        )
        forgot = subprocess.run(
            [*TOLLWAY, "forget", "--url", url, "--user", "zoe"],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(forgot.stdout)["deleted"]["keys"] == 1
        assert "zoe" not in (tmp_path / "state" / "keys.json").read_text()
    assert gw.popen.returncode == 0
    assert key not in gw.text()  # no secret in the gateway's own output


def test_serve_refuses_invalid_policy(tmp_path: Path) -> None:
    policy = tmp_path / "bad.yaml"
    policy.write_text("version: 1\nchain:\n  - name: auth\n    config: {nope: 1}\n")
    res = serve_once(policy)
    assert res.returncode == 1
    assert "chain[0] (auth).config.nope: unknown key (line 4)" in res.stderr
    assert "Traceback" not in res.stderr


def test_demo_prints_a_working_key(tmp_path: Path) -> None:
    emu, port = free_port(), free_port()
    demo = (ROOT / "policies.demo.yaml").read_text().replace("127.0.0.1:9100", f"127.0.0.1:{emu}")
    demo = demo.replace("dir: data", f"dir: {tmp_path}")
    demo = demo.replace("database: data/usage.duckdb", f"database: {tmp_path}/usage.duckdb")
    (tmp_path / "demo.yaml").write_text(demo)
    env = {k: v for k, v in os.environ.items() if k != "TOLLWAY_ADMIN_KEY"}
    proc = Proc(
        [*TOLLWAY, "demo", "--policy", str(tmp_path / "demo.yaml"), "--port", str(port)], env=env
    )
    try:
        key = proc.wait_for(r"demo key \(user 'demo'\): (tw_\S+)").group(1)
        proc.wait_for("Press Ctrl-C")
        curl = re.search(r"curl (http://\S+)", proc.text())
        assert curl and curl.group(1) == f"http://127.0.0.1:{port}/v1/chat/completions"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        reply = client.chat.completions.create(
            model="gpt-5.4-mini", messages=[{"role": "user", "content": "Hello, Tollway"}]
        )
        assert "Hello, Tollway" in (reply.choices[0].message.content or "")
        client.close()
    finally:
        t0 = time.monotonic()
        assert proc.stop() == 0
        assert time.monotonic() - t0 < 10


def test_serve_reports_startup_failures_cleanly(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        policy = tmp_path / "p.yaml"
        policy.write_text(POLICY.format(port=port, emu=1, state=tmp_path / "state"))
        res = serve_once(policy)
    assert res.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in res.stderr
    assert "Traceback" not in res.stderr
    # a plugin that cannot open its resource is named (here: metering's database is a folder)
    (tmp_path / "db.duckdb").mkdir()
    policy.write_text(
        POLICY.format(port=free_port(), emu=1, state=tmp_path / "state")
        + f"  - name: metering\n    config: {{database: {tmp_path}/db.duckdb}}\n"
    )
    res = serve_once(policy)
    assert res.returncode == 1
    assert "plugin metering could not start" in res.stderr
    assert "Traceback" not in res.stderr
