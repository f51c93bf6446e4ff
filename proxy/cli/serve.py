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
import signal
import sys
import threading
from typing import Any

from aiohttp import web

from proxy.policy import Listen, LoadedPolicy, PolicyError, load_file
from proxy.server import GatewayRunner


def _run(coro: Any) -> None:
    """Run on uvloop when it is installed (faster sockets), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)


def _load(path: str) -> LoadedPolicy:
    try:
        return load_file(path)
    except PolicyError as e:
        print(f"{path}: invalid policy", file=sys.stderr)
        for line in e.errors:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(1) from None


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
    loaded = _load(args.file)
    from proxy.chain import compile_chain

    try:
        chain = compile_chain(loaded)
    except PolicyError as e:
        print(f"{args.file}: invalid policy", file=sys.stderr)
        for line in e.errors:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(
        f"{args.file}: ok ({len(loaded.policy.models)} models, chain: "
        f"{', '.join(chain.names) or 'empty'})"
    )
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    from proxy.emulator import serve

    serve(args.host, args.port, api_key=args.api_key)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Emulator + gateway in one process, a demo key printed with ready-to-run examples."""
    os.environ.setdefault("TOLLWAY_ADMIN_KEY", "admin_" + secrets.token_urlsafe(18))
    os.environ.setdefault("OPENAI_API_KEY", "emulator-openai-key")
    os.environ.setdefault("ANTHROPIC_API_KEY", "emulator-anthropic-key")
    loaded = _load(args.policy)
    from urllib.parse import urlsplit

    emu_urls = [p.base_url for p in loaded.policy.providers.values()]
    emu_port = urlsplit(emu_urls[0]).port or 9100 if emu_urls else 9100

    def banner(app: web.Application, port: int) -> None:
        from proxy.appkeys import GATEWAY

        _, key = app[GATEWAY].keystore.create("demo", args.tier)
        base = f"http://{args.host}:{port}"
        print(
            _DEMO_BANNER.format(
                base=base,
                key=key,
                admin=os.environ["TOLLWAY_ADMIN_KEY"],
                emu=f"http://127.0.0.1:{emu_port}",
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


_DEMO_BANNER = """
Tollway demo is running (upstream: the built-in emulator at {emu}).
  demo key (user 'demo'): {key}
  admin key:              {admin}
  live dashboard:         {base}/dashboard#key={admin}

Try it with curl (model "auto" lets Tollway pick a cheap or a strong model):
  curl {base}/v1/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "gpt-5.4-mini", "messages": [{{"role": "user", "content": "Hello, Tollway"}}]}}'

or with the OpenAI Python SDK:
  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="{key}")
  reply = client.chat.completions.create(
      model="gpt-5.4-mini", messages=[{{"role": "user", "content": "Hello, Tollway"}}])
  print(reply.choices[0].message.content)

Press Ctrl-C to stop.
"""
