"""A plugin installed outside the source tree does everything a built-in does, through hooks.

The plugin below is written into a temporary folder with the metadata of an installed
distribution (an entry point of group ``tollway``), so the gateway finds it the way it finds
any third-party plugin, by its chain name. Through ``register_routes``, ``register_commands``,
``model_names`` and ``dashboard_figures`` alone it adds a route answered by the gateway, a
``tollway`` subcommand, a model name of ``GET /v1/models`` and a dashboard figure. Then the
checks of the contract: what a plugin returns or declares wrongly is refused at load, naming it.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.chain import compile_chain
from proxy.hookspecs import hookimpl
from proxy.policy import PolicyError, load_text
from tests.conftest import ADMIN_KEY, BASE_POLICY, Emulator, Gw
from tests.procs import ROOT, fresh_interpreter, run_tollway

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}

PLUGIN = '''
"""tollway-hello: a third-party Tollway plugin."""

from __future__ import annotations

import argparse
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from proxy.figures import Card, Column, Figures, Table
from proxy.hookspecs import hookimpl


class HelloConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    greeting: str = Field("hello", description="What the route says.")


class HelloPlugin:
    Config = HelloConfig

    def __init__(self, config: HelloConfig, policy: Any) -> None:
        self.greeting = config.greeting
        self.calls = 0

    @hookimpl
    def register_routes(self) -> list[web.RouteDef]:
        return [web.get("/hello/{name}", self.hello)]

    async def hello(self, request: web.Request) -> web.Response:
        self.calls += 1
        name = request.match_info["name"]
        return web.json_response({"greeting": f"{self.greeting}, {name}"})

    @staticmethod
    @hookimpl
    def register_commands(subparsers: Any) -> None:
        p = subparsers.add_parser("hello", help="say hello from a plugin")
        p.add_argument("--name", default="world")
        p.set_defaults(fn=cmd_hello)

    @hookimpl
    def model_names(self) -> list[str]:
        return ["hello-model"]

    @hookimpl
    async def dashboard_figures(self) -> Figures:
        return Figures(
            cards=(Card("hello_calls", "hello calls", self.calls),),
            tables=(Table("hellos", "Hellos", (Column("who", "who"),), [{"who": "ann"}]),),
            sections={"hello": {"calls": self.calls}},
        )


def cmd_hello(args: argparse.Namespace) -> int:
    print(f"hello from a plugin, {args.name}")
    return 0
'''


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on sys.path holding the plugin module and its distribution's metadata."""
    folder = tmp_path / "site"
    (folder / "tollway_hello-1.0.dist-info").mkdir(parents=True)
    (folder / "tollway_hello.py").write_text(PLUGIN)
    (folder / "tollway_hello-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tollway-hello\nVersion: 1.0\n"
    )
    (folder / "tollway_hello-1.0.dist-info" / "entry_points.txt").write_text(
        "[tollway]\nhello = tollway_hello:HelloPlugin\n"
    )
    assert not str(folder).startswith(str(ROOT))  # outside the source tree
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop("tollway_hello", None)


CHAIN = "chain:\n  - name: auth\n  - name: hello\n    config: {greeting: hi}\n"


async def test_a_route_a_model_name_and_a_figure(make_gateway: Any, site: Path) -> None:
    gw: Gw = await make_gateway(CHAIN)
    async with gw.http.get(f"{gw.url}/hello/ann") as r:
        assert r.status == 200
        assert await r.json() == {"greeting": "hi, ann"}
        assert r.headers["X-Request-Id"]
    async with gw.http.post(f"{gw.url}/hello/ann") as r:  # the core's 405 for other methods
        assert r.status == 405 and "GET" in r.headers["Allow"]

    client = gw.openai(await gw.create_key("ann"))
    models = {m.id: m.owned_by for m in (await client.models.list()).data}
    assert models["hello-model"] == "tollway" and models["gpt-5.4-mini"] == "openai"

    async with gw.http.get(f"{gw.url}/admin/stats", headers=ADMIN) as r:
        assert r.status == 200
        stats = await r.json()
    assert {"name": "hello_calls", "label": "hello calls", "value": 1, "format": "count"} in (
        stats["cards"]
    )
    assert stats["tables"][0]["name"] == "hellos"
    assert stats["tables"][0]["rows"] == [{"who": "ann"}]
    assert stats["hello"] == {"calls": 1}


async def test_a_reload_serves_the_new_instance(
    make_gateway: Any, site: Path, emulator: Emulator, tmp_path: Path
) -> None:
    gw: Gw = await make_gateway(CHAIN)
    base = BASE_POLICY.format(admin=ADMIN_KEY, emu=emulator.url)
    await gw.gateway.reload(load_text(base + CHAIN.replace("hi", "hey"), base=tmp_path))
    async with gw.http.get(f"{gw.url}/hello/bob") as r:
        assert r.status == 200 and (await r.json())["greeting"] == "hey, bob"
    await gw.gateway.reload(load_text(base + "chain:\n  - name: auth\n", base=tmp_path))
    async with gw.http.get(f"{gw.url}/hello/bob") as r:  # the plugin left the chain
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"


async def test_a_command(site: Path) -> None:
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    code, out = await run_tollway("hello", "--name", "ann", env=env)
    assert (code, out.strip()) == (0, "hello from a plugin, ann")
    code, out = await run_tollway("--help", env=env)
    assert code == 0 and "say hello from a plugin" in out
    code, out = await run_tollway("serve", "--help", env=env)  # parsed without plugins
    assert code == 0 and "--policy" in out


def test_the_command_line_imports_plugins_only_for_their_commands() -> None:
    """``serve``, ``keys``... import no plugin (a gateway loads only its chain's); the data
    commands and the full help import every plugin's commands, but DuckDB only when used."""
    script = (
        "import contextlib, io, sys\n"
        "from proxy.cli import main\n"
        "def run(*argv):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(list(argv))\n"
        "run('serve', '--help'); run('keys', '--help'); run('check', '--help')\n"
        "print(sorted(m for m in sys.modules if m.startswith('plugins.')))\n"
        "run('sql', '--help')\n"
        "print('plugins.metering.cli' in sys.modules, 'duckdb' in sys.modules)\n"
    )
    assert fresh_interpreter(script).splitlines() == ["[]", "True False"]


# ---- the contract, checked at load --------------------------------------------------------


def compile_with(plugin: type, chain: str = "chain:\n  - name: p\n") -> None:
    text = BASE_POLICY.format(admin=ADMIN_KEY, emu="http://127.0.0.1:1") + textwrap.dedent(chain)
    compile_chain(load_text(text), extra_plugins={"p": plugin})


def test_hooks_of_the_wrong_kind_are_refused() -> None:
    class Wrong:
        def __init__(self, config: Any, policy: Any) -> None: ...

        @hookimpl
        async def model_names(self) -> list[str]:
            return []

        @hookimpl
        def register_commands(self, subparsers: Any) -> None: ...

        @hookimpl
        def dashboard_figures(self) -> None: ...

    with pytest.raises(PolicyError) as e:
        compile_with(Wrong)
    assert sorted(e.value.errors) == [
        "chain[0] (p): hook dashboard_figures must be 'async def' (line 20)",
        "chain[0] (p): hook model_names must be a plain 'def' (called once a load) (line 20)",
        "chain[0] (p): hook register_commands must be a @staticmethod (the CLI calls it on "
        "the class, before any policy is loaded) (line 20)",
    ]


def test_bad_contributions_are_refused_naming_the_plugin() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    class Bad:
        def __init__(self, config: Any, policy: Any) -> None: ...

        @hookimpl
        def register_routes(self) -> list[Any]:
            return [web.get("/mine", handler), "/not-a-route"]

        @hookimpl
        def model_names(self) -> list[Any]:
            return ["gpt-5.4-mini", "", "own"]  # a policy model is not repeated: no error

    with pytest.raises(PolicyError) as e:
        compile_with(Bad)
    assert sorted(e.value.errors) == [
        "chain[0] (p): model_names must return names, not '' (line 20)",
        "chain[0] (p): register_routes must return aiohttp route definitions (web.get(...)), "
        "not str (line 20)",
    ]

    class Twice(Bad):
        @hookimpl
        def register_routes(self) -> list[Any]:
            return [web.get("/mine", handler)]

        @hookimpl
        def model_names(self) -> list[Any]:
            return ["gpt-5.4-mini", "own"]

    base = BASE_POLICY.format(admin=ADMIN_KEY, emu="http://127.0.0.1:1")
    with pytest.raises(PolicyError) as e:
        loaded = load_text(base + "chain:\n  - name: p\n  - name: q\n")
        compile_chain(loaded, extra_plugins={"p": Twice, "q": Twice})
    assert e.value.errors == ["chain[1] (q): route GET /mine is already plugin p's (line 21)"]
    loaded = load_text(base + "chain:\n  - name: p\n")
    assert compile_chain(loaded, extra_plugins={"p": Twice}).model_names == ("own",)


async def test_a_route_of_the_core_cannot_be_taken(make_gateway: Any) -> None:
    class Shadow:
        def __init__(self, config: Any, policy: Any) -> None: ...

        @hookimpl
        def register_routes(self) -> list[web.RouteDef]:
            return [web.get("/v1/models", self.models)]

        async def models(self, request: web.Request) -> web.Response:
            return web.json_response({})

    with pytest.raises(PolicyError) as e:
        await make_gateway("chain:\n  - name: shadow\n", extra_plugins={"shadow": Shadow})
    assert e.value.errors == [
        "chain[0] (shadow): route GET /v1/models is the gateway's own (line 20)"
    ]


async def test_a_failing_route_answers_an_error_body(make_gateway: Any) -> None:
    class Broken:
        def __init__(self, config: Any, policy: Any) -> None: ...

        @hookimpl
        def register_routes(self) -> list[web.RouteDef]:
            return [web.get("/broken", self.broken)]

        async def broken(self, request: web.Request) -> web.Response:
            raise RuntimeError("secret detail")

    gw: Gw = await make_gateway("chain:\n  - name: broken\n", extra_plugins={"broken": Broken})
    async with gw.http.get(f"{gw.url}/broken") as r:
        body = await r.text()
        assert r.status == 500 and "internal_error" in body and "secret" not in body
