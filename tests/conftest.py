"""Shared fixtures: a real emulator and real gateways on loopback ports, driven over HTTP.

Everything runs in one event loop (session scope) so tests can use the async SDK clients
against in-process servers that still speak real HTTP over TCP sockets.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import socket
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import redis
import yaml
from aiohttp import web

from proxy.app import create_app
from proxy.appkeys import GATEWAY
from proxy.chain import compile_chain
from proxy.emulator import create_emulator_app
from proxy.gateway import Gateway
from proxy.policy import PolicyError, load_text
from proxy.server import GatewayRunner
from tests.procs import start_redis, stop_redis

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

    async def in_flight(self) -> int:
        """Requests the emulator is answering now (a condition for :func:`until`)."""
        return int((await self.stats())["in_flight"])

    async def last(self) -> dict[str, Any]:
        async with self.http.get(f"{self.url}/_emulator/last") as r:
            return await r.json()  # type: ignore[no-any-return]


def redis_binary() -> str:
    """The redis-server binary the Redis tests start. Without one they skip, except under
    CI=true, where a missing binary fails the run (.ci/run installs it)."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no redis-server binary: the Redis tests must run")
        pytest.skip("no redis-server")
    return binary


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """The suite's own redis-server (``redis://127.0.0.1:PORT``): started on a free port
    without persistence, stopped at the end of the run.

    Never a Redis the suite did not start: a developer's own on :6379 keeps its data.
    """
    port = free_port()
    proc = start_redis(redis_binary(), port)
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        stop_redis(proc)


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """An empty database of the suite's redis-server, this test's alone: everything a
    previous test left there is gone (the server is the suite's, so it may be flushed)."""
    with redis.Redis.from_url(f"{redis_server}/0") as client:
        client.flushall()
    return f"{redis_server}/0"


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


def policy(start: Mapping[str, Any] | None = None, /, **overrides: Any) -> dict[str, Any]:
    """A test policy as a fresh dict: ``start`` (the tests' base policy, ``BASE_POLICY``,
    when omitted) with ``overrides`` merged in. A mapping merges key by key into the mapping
    it names, at any depth; any other value replaces. For ``make_gateway(base=...)``, instead
    of editing a policy's text::

        policy(state={"url": redis_url}, providers={"openai": {"timeout": {"read": "300ms"}}})
        policy(PLANS_BASE, tiers={"free": {"requests_per_month": 3}})
        {**policy(), "features": {...}, "tiers": {...}}   # whole sections replaced

    ``"{emu}"`` in a string stands for the emulator's URL; paths may be ``Path``s.
    """
    return _merged(copy.deepcopy(_BASE if start is None else start), overrides)


def _merged(base: Any, override: Any) -> Any:
    if isinstance(override, Mapping):
        merged = dict(base) if isinstance(base, Mapping) else {}
        for key, value in override.items():
            merged[key] = _merged(merged.get(key), value)
        return merged
    if isinstance(override, Path):
        return str(override)
    if isinstance(override, list):
        return [_merged(None, v) for v in override]
    return copy.deepcopy(override)


def policy_text(data: Mapping[str, Any], emu: str | None = None) -> str:
    """A policy dict (from :func:`policy`) as the YAML text a policy file holds; ``emu``:
    the provider URL that ``{emu}`` stands for (make_gateway fills in its emulator's)."""
    text = yaml.safe_dump(_merged(None, data), sort_keys=False)
    return text if emu is None else text.replace("{emu}", emu)


_BASE: dict[str, Any] = yaml.safe_load(BASE_POLICY.format(admin=ADMIN_KEY, emu="{emu}"))


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
    """Start gateways: ``await make_gateway(chain, base=...)``.

    ``chain``: the ``chain:`` section's text, or its entries as a list of dicts. ``base``: the
    rest of the policy, a :func:`policy` dict or a ``BASE_POLICY``-style text template (its
    ``{admin}`` and ``{emu}`` filled in). ``{emu}`` anywhere is the emulator's URL.
    """
    runners: list[web.AppRunner] = []
    clients: list[Any] = []
    http = aiohttp.ClientSession()

    async def start(
        chain: str | list[dict[str, Any]] = "chain:\n  - name: auth\n",
        *,
        base: str | Mapping[str, Any] = BASE_POLICY,
        extra_plugins: dict[str, Any] | None = None,
        path: Path | None = None,
    ) -> Gw:
        if isinstance(chain, list):  # the chain's entries as data: dumped, never text-edited
            chain = policy_text({"chain": chain})
        if isinstance(base, Mapping):
            text = policy_text(base) + textwrap.dedent(chain)
        else:
            text = base.format(admin=ADMIN_KEY, emu=emulator.url) + textwrap.dedent(chain)
        text = text.replace("{emu}", emulator.url)
        if path is not None:
            path.write_text(text)
        loaded = load_text(text, base=tmp_path, path=path)
        app = create_app(loaded, extra_plugins=extra_plugins)
        # the connection handling `tollway serve` uses: header deadline, JSON protocol errors
        runner: web.AppRunner = GatewayRunner(
            app,
            handler_cancellation=True,
            access_log=None,
            header_timeout=loaded.policy.listen.header_timeout,
        )
        try:
            runner, url = await start_site(app, runner)
        except BaseException:
            # a plugin that fails to start: close what the contexts before it opened (the
            # upstream session), as the process exit does for `tollway serve`
            with contextlib.suppress(Exception):
                await app.cleanup()
            raise
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
