"""One gateway per state.dir: a second `tollway serve` on the same folder exits 1 naming the
first's pid; once the first is gone (even killed), the folder is free again."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from proxy.statedir import hold
from tests.conftest import free_port
from tests.procs import TOLLWAY, Proc, serve_once

POLICY = """\
version: 1
listen: {{host: 127.0.0.1, port: {port}}}
state: {{dir: {state}}}
providers:
  openai: {{kind: openai, base_url: "http://127.0.0.1:1/v1", api_key: k}}
models:
  gpt-5.4-mini: {{provider: openai}}
chain:
  - name: auth
"""


def policy(tmp_path: Path, name: str, state: Path) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(POLICY.format(port=free_port(), state=state))
    return path


def test_a_second_gateway_on_one_state_dir_refuses_to_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = Proc([*TOLLWAY, "serve", "--policy", str(policy(tmp_path, "a", state))])
    try:
        first.wait_for("tollway listening")
        second = serve_once(policy(tmp_path, "b", state))
        assert second.returncode == 1
        assert f"state.dir {state} is in use by pid {first.popen.pid}" in second.stderr
        first.popen.send_signal(signal.SIGKILL)  # the kernel drops a dead holder's lock
        first.popen.wait(10)
    finally:
        first.stop()
    fd = hold(state)  # free again
    assert (state / "tollway.lock").read_text().strip() == str(os.getpid())
    os.close(fd)
