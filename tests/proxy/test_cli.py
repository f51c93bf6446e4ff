"""The `tollway` command end to end: serve + SIGHUP reload, keys, and the `make run` demo."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest

from proxy.chain import compile_chain
from proxy.cli.serve import _demo_data, _demo_example, _duration_text
from proxy.hookspecs import hookimpl
from proxy.policy import load_text
from tests.conftest import free_port, policy, policy_text
from tests.procs import ROOT, TOLLWAY, Http, Proc, fresh_interpreter, running
from tests.procs import serve_once as procs_serve_once

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
    return procs_serve_once(policy, {"TOLLWAY_ADMIN_KEY": "x"})


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


def demo_policy(tmp_path: Path) -> Path:
    """policies.demo.yaml with its emulator on a free port and its data under ``tmp_path``."""
    emu = free_port()
    demo = (ROOT / "policies.demo.yaml").read_text().replace("127.0.0.1:9100", f"127.0.0.1:{emu}")
    demo = demo.replace("dir: data", f"dir: {tmp_path}")
    demo = demo.replace("database: data/usage.duckdb", f"database: {tmp_path}/usage.duckdb")
    (tmp_path / "demo.yaml").write_text(demo)
    return tmp_path / "demo.yaml"


def start_demo(policy: Path, port: int) -> Proc:
    """`tollway demo` as a new user's shell starts it: no admin key or gateway URL set."""
    unset = ["env", "-u", "TOLLWAY_ADMIN_KEY", "-u", "TOLLWAY_URL"]
    return Proc([*unset, *TOLLWAY, "demo", "--policy", str(policy), "--port", str(port)])


def run_printed(line: str, exports: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A command line the demo printed, run the way a user pastes it into a new shell (in the
    project root, as `make run` is) after the printed `export` line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    return subprocess.run(
        shlex.split(line),
        cwd=ROOT,
        env={**env, **exports},
        capture_output=True,
        text=True,
        timeout=30,
    )


def printed(banner: str, pattern: str) -> str:
    """The first group of ``pattern`` (a whole line) in what the demo printed."""
    m = re.search(pattern, banner, re.M)
    assert m, f"{pattern!r} not printed:\n{banner}"
    return m.group(1)


def printed_exports(banner: str) -> dict[str, str]:
    """The variables of the banner's `export` line."""
    return dict(pair.split("=", 1) for pair in printed(banner, r"^  export (.+)$").split())


def as_in_readme(banner: str, data: Path) -> str:
    """The banner the way the README shows it: default ports, keys shortened, ./data."""
    port = printed(banner, r"tollway listening on http://127\.0\.0\.1:(\d+)$")
    emu = printed(banner, r"the built-in emulator at http://127\.0\.0\.1:(\d+)\)")
    banner = banner.replace(f"127.0.0.1:{port}", "127.0.0.1:8080")
    banner = banner.replace(f"127.0.0.1:{emu}", "127.0.0.1:9100").replace(f"{data}/", "data/")
    banner = re.sub(r"\b(tw|admin)_[\w-]+", r"\1_...", banner)
    return re.sub(r"^  \S+ keys list$", "  .venv/bin/tollway keys list", banner, flags=re.M)


def printed_curl(banner: str) -> tuple[str, dict[str, str], bytes]:
    """(path, headers, body) of the banner's curl example."""
    lines = banner[banner.index("  curl ") :].splitlines()
    end = next(i for i, line in enumerate(lines) if line.lstrip().startswith("-d "))
    args = shlex.split(" ".join(line.rstrip("\\") for line in lines[: end + 1]))
    url = next(a for a in args if a.startswith("http://"))
    headers = dict(args[i + 1].split(": ", 1) for i, a in enumerate(args) if a == "-H")
    return urlsplit(url).path, headers, args[args.index("-d") + 1].encode()


def test_demo_prints_a_working_key(tmp_path: Path) -> None:
    port = free_port()
    # Proc's env is laid over this process's: only `env -u` takes the admin key away, so the
    # demo must make one up (as in a new user's shell)
    unset = ["env", "-u", "TOLLWAY_ADMIN_KEY"]
    proc = Proc(
        [*unset, *TOLLWAY, "demo", "--policy", str(demo_policy(tmp_path)), "--port", str(port)]
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


def test_demo_quick_start_works_as_printed(tmp_path: Path) -> None:
    """The README's quick start: the export line lets `tollway keys list` reach the demo, the
    curl example routes `model: auto` and its second run is a cache hit, and a second
    `make run` revokes the first run's demo key instead of piling keys up."""
    policy = demo_policy(tmp_path)
    port = free_port()
    proc = start_demo(policy, port)
    try:
        first_key = proc.wait_for(r"demo key \(user 'demo'\): (tw_\S+)").group(1)
        proc.wait_for("Press Ctrl-C")
        banner = proc.text()
        assert f"keys in {tmp_path}/keys.json, usage in {tmp_path}/usage.duckdb" in banner
        exports = printed_exports(banner)
        assert exports["TOLLWAY_URL"] == f"http://127.0.0.1:{port}"
        assert set(exports) == {"TOLLWAY_ADMIN_KEY", "TOLLWAY_URL"}
        listed = run_printed(printed(banner, r"^  (.+ keys list)$"), exports)
        assert listed.returncode == 0, listed.stderr
        assert [line.split("\t")[1:3] for line in listed.stdout.splitlines()] == [["demo", "pro"]]

        assert '"model": "auto"' in banner and "X-Tollway-Route" in banner
        path, headers, body = printed_curl(banner)
        assert headers["Authorization"] == f"Bearer {first_key}"
        assert f"the feature {headers['X-Tollway-Feature']} is cached for" in " ".join(
            banner.split()
        )
        http = Http(port)
        try:
            seen = [http.post(path, body, dict(headers)) for _ in range(2)]
        finally:
            http.close()
        assert [status for status, _, _ in seen] == [200, 200]
        assert [h["x-tollway-cache"] for _, h, _ in seen] == ["miss", "hit"]
        assert all(h["x-tollway-route"].startswith(("cheap", "strong")) for _, h, _ in seen)

        # the README shows this banner: every line it quotes is printed
        readme = (ROOT / "README.md").read_text()
        quoted = readme.split("It prints (keys shortened", 1)[1].split("```\n", 2)[1]
        shown = as_in_readme(banner, tmp_path)
        for line in filter(None, quoted.splitlines()):
            assert line in shown.splitlines(), (
                f"README quotes a line the demo does not print: {line}"
            )
    finally:
        assert proc.stop() == 0

    port = free_port()
    proc = start_demo(policy, port)
    try:
        second_key = proc.wait_for(r"demo key \(user 'demo'\): (tw_\S+)").group(1)
        proc.wait_for("Press Ctrl-C")
        assert "1 earlier demo key(s) revoked" in proc.text()
        listed = run_printed(
            printed(proc.text(), r"^  (.+ keys list)$"), printed_exports(proc.text())
        )
        assert len(listed.stdout.splitlines()) == 1, listed.stdout
        http = Http(port)
        try:
            for key, expected in ((first_key, 401), (second_key, 200)):
                status, _, _ = http.post(
                    "/v1/chat/completions",
                    b'{"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "hi"}]}',
                    {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                )
                assert status == expected
        finally:
            http.close()
    finally:
        assert proc.stop() == 0


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


class Shelf:
    """A third-party plugin telling the demo's banner what it answers for, caches and keeps."""

    def __init__(self, config: Any, policy: Any) -> None:
        pass

    @hookimpl
    def model_names(self) -> list[str]:
        return ["shelf-auto"]

    @hookimpl
    def cached_features(self) -> dict[str, float]:
        return {"basic_suggestions": 5400.0, "elsewhere": 30.0}

    @hookimpl
    def data_files(self) -> dict[str, str]:
        return {"shelves": "data/shelf.db"}


def test_demo_banner_reads_plugins_through_their_hooks(tmp_path: Path) -> None:
    """The banner's model, cached feature and files come from the compiled chain's hooks
    (``model_names``, ``cached_features``, ``data_files``), never from a plugin's config by
    its name: a plugin the core has never heard of is described the same way."""
    base = policy(state={"dir": tmp_path}, chain=[{"name": "shelf"}])
    chain = compile_chain(
        load_text(policy_text(base, "http://127.0.0.1:9")), extra_plugins={"shelf": Shelf}
    )
    example = " ".join(_demo_example(chain.loaded, chain, "http://gw", "tw_k", "pro").split())
    assert '"model": "shelf-auto"' in example
    assert "the feature basic_suggestions is cached for 90m" in example
    assert (
        "Cached features (the cache plugin's ttl): basic_suggestions 90m, elsewhere 30s;" in example
    )
    assert _demo_data(chain.loaded, chain, 0).startswith(
        f"keys in {tmp_path}/keys.json, shelves in data/shelf.db\n"
    )
    assert [_duration_text(s) for s in (604800, 3600, 259200, 90, 0.1)] == [
        "7d",
        "1h",
        "3d",
        "90s",
        "0.1s",
    ]


def test_the_full_help_imports_no_state_backend() -> None:
    """``tollway --help`` imports every plugin module to collect its commands: none of them
    may load a Redis client or the limits library (~50 ms) at import, only where a backend
    is built."""
    script = (
        "import contextlib, io, sys\n"
        "from proxy.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "print('plugins.limits.plugin' in sys.modules, 'plugins.cache.plugin' in sys.modules)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'limits', 'redis', 'aiocache'}))\n"
    )
    assert fresh_interpreter(script).splitlines() == ["True True", "[]"]
