"""Running the gateway: ``tollway serve``, ``check``, ``emulator`` and ``demo``.

What it takes to get a gateway serving lives here: loading and checking the policy, running on
uvloop when it is installed, binding (a failure is one line, not a traceback), keeping the
garbage collector off the request path, and the signals (``SIGHUP`` reloads the policy,
``SIGTERM`` and ``SIGINT`` stop, in-flight requests getting ``listen.shutdown_timeout``).
``demo`` runs the emulator and the gateway in one process and prints a demo key with
ready-to-run examples.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import secrets
import shutil
import signal
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.policy import Listen, LoadedPolicy, PolicyError, read_file
from proxy.server import GatewayRunner


def _run(coro: Any) -> None:
    """Run on uvloop when it is installed (faster sockets), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)


def _load(path: str, *, secrets_required: bool = True) -> LoadedPolicy:
    """Read a policy file; exit 1 printing every error of it, its chain's included."""
    try:
        loaded = read_file(path, secrets_required=secrets_required)
    except PolicyError as e:
        _report(path, e.errors, [])
        raise SystemExit(1) from None
    if loaded.errors:
        from proxy.chain import check_chain  # plugins are imported only where they are used

        _report(path, check_chain(loaded), loaded.warnings)
        raise SystemExit(1)
    return loaded


def _report(path: str, errors: list[str], warnings: list[str]) -> None:
    if errors:
        print(f"{path}: invalid policy", file=sys.stderr)
    for line in errors:
        print(f"  {line}", file=sys.stderr)
    for line in warnings:
        print(f"  warning: {line}", file=sys.stderr)


async def _start(
    app: web.Application, host: str, port: int, listen: Listen | None = None
) -> tuple[web.AppRunner, int]:
    """Set up and bind; a failure (a plugin that cannot start, a taken port) is one line.

    With ``listen`` (the gateway, not the demo's emulator) connections get the policy's header
    deadline and JSON protocol errors (proxy/server.py), and in-flight requests get
    ``shutdown_timeout`` to finish when the runner is cleaned up.
    """
    runner: web.AppRunner
    if listen is None:
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    else:
        runner = GatewayRunner(
            app,
            handler_cancellation=True,
            access_log=None,
            header_timeout=listen.header_timeout,
            # aiohttp waits this long for a busy connection's handler, then as long again
            # before it cancels it: half the policy's timeout each, so a request still
            # running shutdown_timeout after SIGTERM is cancelled then
            shutdown_timeout=listen.shutdown_timeout / 2,
        )
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
        await site.start()
    except OSError as e:
        await runner.cleanup()
        print(f"tollway: cannot listen on {host}:{port}: {e.strerror}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as e:
        await runner.cleanup()
        print(f"tollway: cannot start: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    server = site._server
    sockets = getattr(server, "sockets", None)
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, bound


GC_THRESHOLD = 10_000


def _tune_gc() -> None:
    """Keep the cyclic garbage collector off the request path.

    Start-up objects (modules, the policy, plugin configs: ~70k of them) live as long as the
    process, so they are frozen out of every later collection. A request allocates hundreds of
    short-lived containers that die by reference counting (tests/proxy/test_cycles.py keeps it
    so); with CPython's default first-generation threshold of 700 the collector still ran every
    ~20 requests under load, walking the in-flight requests' objects only to promote them.
    Measured with ``gc.callbacks`` under c=32 load: collections took ~39 µs per request before
    this and the end of the per-request cycle; none ran at all in a 5 s run after. The price:
    start-up objects that a reload later drops are freed by reference counting only, so any
    reference cycle among them stays (a policy's worth of memory at most, per reload).
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, gen1, gen2)


async def _run_gateway(loaded: LoadedPolicy, host: str, port: int, banner: Any = None) -> None:
    from proxy.app import create_app
    from proxy.appkeys import GATEWAY

    try:
        app = create_app(loaded)
    except PolicyError as e:
        for line in e.errors:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(1) from None
    listen = loaded.policy.listen
    runner, bound = await _start(app, host, port, listen)
    _tune_gc()
    print(f"tollway listening on http://{host}:{bound}", flush=True)
    if banner is not None:
        banner(app, bound)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    async def reload() -> None:
        try:
            await app[GATEWAY].reload()
            print("policy reloaded", flush=True)
        except PolicyError as e:
            print("policy reload refused; the previous policy keeps serving:", file=sys.stderr)
            for line in e.errors:
                print(f"  {line}", file=sys.stderr)

    tasks: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = loop.create_task(reload())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    _exit_if_stuck(2 * listen.shutdown_timeout)
    await runner.cleanup()  # in-flight requests get shutdown_timeout, then plugins close


def _exit_if_stuck(seconds: float) -> None:
    """End the process ``seconds`` from now if it has not exited by itself.

    In-flight requests get ``shutdown_timeout`` and closing the plugins gets as long again;
    something that ignores cancellation (a query in a worker thread, a blocked loop) must not
    keep a stopping gateway alive past that, so a daemon thread, which neither the event
    loop nor the interpreter's exit waits for, ends it.
    """

    def expire() -> None:
        print(f"tollway: shutdown took longer than {seconds:g}s; exiting", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def cmd_serve(args: argparse.Namespace) -> int:
    loaded = _load(args.policy)
    listen = loaded.policy.listen
    port = args.port if args.port is not None else listen.port
    _run(_run_gateway(loaded, args.host or listen.host, port))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Every error of the file in one run, each with its path and line; exit 1 if any.

    A secret the machine does not have (a fresh clone, CI) is a warning and the rest is
    checked as if it were set, so a policy can be checked where it is written; ``--strict``
    makes it an error, as it is for ``serve``.
    """
    loaded = _load(args.file, secrets_required=args.strict)
    from proxy.chain import compile_chain

    try:
        compile_chain(loaded)
    except PolicyError as e:
        _report(args.file, e.errors, loaded.warnings)
        return 1
    _report(args.file, [], loaded.warnings)
    names = [item.name for _, item in loaded.chain_items() if item.enabled]
    unset = f", {len(loaded.warnings)} secrets not set here" if loaded.warnings else ""
    print(
        f"{args.file}: ok ({len(loaded.policy.models)} models, chain: "
        f"{', '.join(names) or 'empty'}{unset})"
    )
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    from proxy.emulator import serve

    serve(args.host, args.port, api_key=args.api_key)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Emulator + gateway in one process, a demo key printed with ready-to-run examples.

    What it prints is the README's quick start, so it has to work exactly as printed: the
    ``export`` line gives the other ``tollway`` commands the admin key and the gateway's URL,
    and the curl example names ``model: auto`` and a cached feature, so running it twice shows
    the routing header and a cache hit. Each run issues a fresh demo key (issued keys are
    stored hashed, so an old one cannot be shown again); the earlier runs' demo keys are
    revoked first, so they do not pile up, and the banner says where keys and usage live.
    """
    os.environ.setdefault("TOLLWAY_ADMIN_KEY", "admin_" + secrets.token_urlsafe(18))
    os.environ.setdefault("OPENAI_API_KEY", "emulator-openai-key")
    os.environ.setdefault("ANTHROPIC_API_KEY", "emulator-anthropic-key")
    loaded = _load(args.policy)
    from urllib.parse import urlsplit

    emu_urls = [p.base_url for p in loaded.policy.providers.values()]
    emu_port = urlsplit(emu_urls[0]).port or 9100 if emu_urls else 9100

    def banner(app: web.Application, port: int) -> None:
        from proxy.appkeys import GATEWAY

        keystore = app[GATEWAY].keystore
        revoked, _ = keystore.forget_user(_DEMO_USER)
        _, key = keystore.create(_DEMO_USER, args.tier)
        base = f"http://{args.host}:{port}"
        admin = os.environ["TOLLWAY_ADMIN_KEY"]
        print(
            _DEMO_BANNER.format(
                base=base,
                key=key,
                admin=admin,
                emu=f"http://127.0.0.1:{emu_port}",
                data=_demo_data(loaded, len(revoked)),
                exports=f"export TOLLWAY_ADMIN_KEY={admin} TOLLWAY_URL={base}",
                tollway=_tollway_command(),
                example=_demo_example(loaded, base, key, args.tier),
            ),
            flush=True,
        )

    async def main() -> None:
        from proxy.emulator import create_emulator_app

        emu_runner, _ = await _start(create_emulator_app(), "127.0.0.1", emu_port)
        try:
            await _run_gateway(loaded, args.host, args.port, banner)
        finally:
            await emu_runner.cleanup()

    _run(main())
    return 0


_DEMO_USER = "demo"
_WIDTH = 96  # the banner's prose lines; commands are printed whole, to be pasted


def _chain_config(loaded: LoadedPolicy, name: str) -> dict[str, Any]:
    """The ``config:`` written for chain entry ``name`` ({} when the chain has none).

    Only for the demo's banner, which explains the policy it runs: it reads what the file
    says, as a reader of the file would, and never the plugin itself.
    """
    for item in loaded.policy.chain:
        if item.name == name and item.enabled:
            return dict(item.config)
    return {}


def _demo_data(loaded: LoadedPolicy, revoked: int) -> str:
    """Where the demo's keys and usage are kept, and how to start over."""
    state = loaded.policy.state.dir
    earlier = f"; {revoked} earlier demo key(s) revoked" if revoked else ""
    if state is None:
        return f"keys are kept in memory only (state.dir: null){earlier}"
    database = _chain_config(loaded, "metering").get("database")
    usage = f", usage in {database}" if isinstance(database, str) else ""
    return (
        f"keys in {state}/keys.json{usage}{earlier}\n"
        f"                          (stop the demo and delete these files to start from nothing)"
    )


def _plan_features(loaded: LoadedPolicy, tier: str) -> set[str]:
    """The features of a plan, with those of the plans it ``includes``."""
    tiers, out, seen = loaded.policy.tiers, set(), set()
    name: str | None = tier
    while name is not None and name in tiers and name not in seen:
        seen.add(name)
        out.update(tiers[name].features)
        name = tiers[name].includes
    return out


def _demo_example(loaded: LoadedPolicy, base: str, key: str, tier: str) -> str:
    """The curl example: ``model: auto`` when the policy routes it, and a feature the cache
    keeps (within the demo key's plan), so the same request twice shows a hit."""
    policy = loaded.policy
    auto = _chain_config(loaded, "routing").get("auto")
    auto_name = str(auto.get("name", "auto")) if isinstance(auto, dict) else None
    model = auto_name or next(iter(policy.models), "gpt-5.4-mini")
    ttl = _chain_config(loaded, "cache").get("ttl")
    ttls = {str(f): str(t) for f, t in ttl.items()} if isinstance(ttl, dict) else {}
    allowed = _plan_features(loaded, tier)
    feature = next((f for f in ttls if f in allowed), None)
    lines = ["Try it with curl"]
    if auto_name:
        lines[0] += (
            f'. "model": "{auto_name}" lets Tollway pick a cheap or a strong model'
            " (the X-Tollway-Route header says which and why)"
        )
    if feature:
        lines[0] += (
            f"; the feature {feature} is cached for {ttls[feature]}, so the same request"
            " again is answered with X-Tollway-Cache: hit"
        )
    lines[0] = textwrap.fill(lines[0] + ":", _WIDTH, break_on_hyphens=False)
    lines.append(f"  curl {base}/v1/chat/completions -i \\")
    lines.append(f'    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\')
    if feature:
        lines.append(f'    -H "X-Tollway-Feature: {feature}" \\')
    lines.append(
        f"""    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello, Tollway"}}]}}'"""
    )
    if ttls:
        cached = ", ".join(f"{f} {t}" for f, t in ttls.items())
        lines.append(
            textwrap.fill(
                f"Cached features (the cache plugin's ttl): {cached}; replies of any other"
                " feature carry X-Tollway-Cache: bypass.",
                _WIDTH,
                break_on_hyphens=False,
            )
        )
    return "\n".join(lines)


def _tollway_command() -> str:
    """How to run ``tollway`` from the user's shell: its name when that is on the PATH, else
    the script beside this interpreter (``make run`` does not activate the virtualenv)."""
    script = Path(sys.executable).with_name("tollway")
    found = shutil.which("tollway")
    if not script.exists() or (found is not None and Path(found).absolute() == script.absolute()):
        return "tollway"
    try:
        return str(script.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(script)


_DEMO_BANNER = """
Tollway demo is running (upstream: the built-in emulator at {emu}).
  demo key (user 'demo'): {key}
  admin key:              {admin}
  live dashboard:         {base}/dashboard#key={admin}
  data:                   {data}

In another shell, the tollway command finds this gateway with:
  {exports}
  {tollway} keys list

{example}

or with the OpenAI Python SDK:
  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="{key}")
  reply = client.chat.completions.create(
      model="gpt-5.4-mini", messages=[{{"role": "user", "content": "Hello, Tollway"}}])
  print(reply.choices[0].message.content)

Press Ctrl-C to stop.
"""
