"""Shared fixtures: a real emulator and real gateways on loopback ports, driven over HTTP.

Everything runs in one event loop (session scope) so tests can use the async SDK clients
against in-process servers that still speak real HTTP over TCP sockets.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.appkeys import GATEWAY
from proxy.chain import compile_chain
from proxy.emulator import create_emulator_app
from proxy.gateway import Gateway
from proxy.policy import PolicyError, load_text
from proxy.server import GatewayRunner
from tests.procs import reachable, start_redis

ADMIN_KEY = "test-admin-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_site(
    app: web.Application, runner: web.AppRunner | None = None
) -> tuple[web.AppRunner, str]:
    runner = runner or web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return runner, f"http://127.0.0.1:{port}"


@dataclass
class Emulator:
    url: str
    http: aiohttp.ClientSession

    async def stats(self) -> dict[str, Any]:
        async with self.http.get(f"{self.url}/_emulator/stats") as r:
            return await r.json()  # type: ignore[no-any-return]

    async def reset(self) -> None:
        async with self.http.post(f"{self.url}/_emulator/reset") as r:
            assert r.status == 200

    async def last(self) -> dict[str, Any]:
        async with self.http.get(f"{self.url}/_emulator/last") as r:
            return await r.json()  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A real redis-server: CI's on :6379, else one started on :6390 from the binary.

    Without redis the Redis tests skip, except under CI=true, where they must run.
    """
    if reachable(6379):
        yield "redis://127.0.0.1:6379"
        return
    server = shutil.which("redis-server")
    if server is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no redis on :6379 and no redis-server binary to start")
        pytest.skip("no redis-server")
    started = False
    if not reachable(6390):
        start_redis(server, 6390, daemonize=True)
        started = True
    yield "redis://127.0.0.1:6390"
    if started and (cli := shutil.which("redis-cli")):
        subprocess.run([cli, "-p", "6390", "shutdown", "nosave"], check=False)


@pytest.fixture(scope="session")
async def emulator() -> AsyncIterator[Emulator]:
    runner, url = await start_site(create_emulator_app(api_key="upstream-secret"))
    async with aiohttp.ClientSession() as http:
        yield Emulator(url, http)
    await runner.cleanup()


BASE_POLICY = """
version: 1
admin: {{key: {admin}}}
state: {{dir: null}}
providers:
  openai: {{kind: openai, base_url: "{emu}/v1", api_key: upstream-secret,
           retries: {{attempts: 2, backoff: 10ms}}, timeout: {{connect: 2s, read: 5s}}}}
  anthropic: {{kind: anthropic, base_url: "{emu}", api_key: upstream-secret,
              retries: {{attempts: 2, backoff: 10ms}}, timeout: {{connect: 2s, read: 5s}}}}
models:
  gpt-5.4-mini: {{provider: openai, input_per_mtok: 0.25, output_per_mtok: 2.0}}
  claude-sonnet: {{provider: anthropic, upstream_model: claude-sonnet-5, input_per_mtok: 3, output_per_mtok: 15}}
  text-embedding-3-small: {{provider: openai, input_per_mtok: 0.02}}
features:
  basic_suggestions: {{price_per_request: 0.01}}
tiers:
  free: {{requests_per_month: 1000, requests_per_minute: 5, features: [basic_suggestions]}}
  pro: {{includes: free, requests_per_month: 25000, requests_per_minute: 30, monthly_cost: 29}}
"""


@dataclass
class Gw:
    """A running gateway: its URL, app, and helpers to make keys and SDK clients."""

    url: str
    app: web.Application
    http: aiohttp.ClientSession
    clients: list[Any]

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    async def create_key(self, user: str = "alice", tier: str = "pro") -> str:
        async with self.http.post(
            f"{self.url}/admin/keys",
            json={"user": user, "tier": tier},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        ) as r:
            assert r.status == 201, await r.text()
            return str((await r.json())["key"])

    def openai(self, key: str, **kw: Any) -> openai.AsyncOpenAI:
        kw.setdefault("max_retries", 0)
        client = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, **kw)
        self.clients.append(client)
        return client

    def anthropic(self, key: str, **kw: Any) -> anthropic.AsyncAnthropic:
        kw.setdefault("max_retries", 0)
        client = anthropic.AsyncAnthropic(base_url=self.url, api_key=key, **kw)
        self.clients.append(client)
        return client


GatewayFactory = Callable[..., Any]


@pytest.fixture
async def make_gateway(emulator: Emulator, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start gateways from policy text: ``await make_gateway(chain_yaml, extra_yaml=...)``.

    ``{emu}`` in the text is the emulator URL; the base policy supplies providers and models.
    """
    runners: list[web.AppRunner] = []
    clients: list[Any] = []
    http = aiohttp.ClientSession()

    async def start(
        chain: str = "chain:\n  - name: auth\n",
        *,
        base: str = BASE_POLICY,
        extra_plugins: dict[str, Any] | None = None,
        path: Path | None = None,
    ) -> Gw:
        text = base.format(admin=ADMIN_KEY, emu=emulator.url) + textwrap.dedent(chain)
        text = text.replace("{emu}", emulator.url)
        if path is not None:
            path.write_text(text)
        loaded = load_text(text, base=tmp_path, path=path)
        app = create_app(loaded, extra_plugins=extra_plugins)
        # the connection handling `tollway serve` uses: header deadline, JSON protocol errors
        runner = GatewayRunner(
            app,
            handler_cancellation=True,
            access_log=None,
            header_timeout=loaded.policy.listen.header_timeout,
        )
        runner, url = await start_site(app, runner)
        runners.append(runner)
        return Gw(url, app, http, clients)

    yield start
    for c in clients:
        await c.close()
    for r in runners:
        await r.cleanup()
    await http.close()


@pytest.fixture
async def gw(make_gateway: Callable[..., Any]) -> Gw:
    return await make_gateway()  # type: ignore[no-any-return]


@pytest.fixture
async def key(gw: Gw) -> str:
    return await gw.create_key()


def config_error(plugin: str, config: str, base: str = BASE_POLICY) -> str:
    """The one error compiling a chain of just ``plugin`` with ``config`` gives."""
    text = base.format(admin=ADMIN_KEY, emu="http://127.0.0.1:1")
    text += f"chain:\n  - name: {plugin}\n    config: {config}\n"
    with pytest.raises(PolicyError) as info:
        compile_chain(load_text(text))
    assert len(info.value.errors) == 1, info.value.errors
    return info.value.errors[0]
