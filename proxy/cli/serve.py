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
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy.cli.runner import load_policy, report_errors, run, start_site
from proxy.policy import LoadedPolicy, PolicyError

if TYPE_CHECKING:
    from proxy.chain import Chain, Hook


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


async def _run_gateway(
    loaded: LoadedPolicy, host: str, port: int, banner: Any = None, *, reuse_port: bool = False
) -> None:
    from proxy.app import create_app
    from proxy.appkeys import GATEWAY

    try:
        app = create_app(loaded)
    except PolicyError as e:
        for line in e.errors:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(1) from None
    listen = loaded.policy.listen
    runner, bound = await start_site(app, host, port, listen, reuse_port=reuse_port)
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


def _hold_state_dir(loaded: LoadedPolicy) -> None:
    """Exit 1 if another gateway uses this ``state.dir`` (``proxy.statedir``); else hold it."""
    from proxy.statedir import StateDirInUse, hold

    folder = loaded.policy.state.dir
    if folder is None:
        return
    try:
        hold(folder)  # the descriptor stays open, and the lock held, until the process ends
    except StateDirInUse as e:
        print(f"tollway: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_serve(args: argparse.Namespace) -> int:
    worker = args.worker_of is not None
    if worker:
        from proxy import policy
        from proxy.cli.workers import become_worker

        become_worker(args.worker_of)
        policy.WORKER_STATE_DIR = f"worker-{args.worker}"  # holds its own folder below
    loaded = load_policy(args.policy)
    if not worker and args.workers != 1:
        from proxy.cli.workers import refusal

        why = refusal(loaded, args.workers)
        if why is not None:
            print(f"tollway: {why}", file=sys.stderr)
            return 1
    _hold_state_dir(loaded)
    listen = loaded.policy.listen
    port = args.port if args.port is not None else listen.port
    host = args.host or listen.host
    if not worker and args.workers != 1:
        from proxy.cli.workers import serve_workers

        return serve_workers(loaded, args.policy, host, port, args.workers)
    run(_run_gateway(loaded, host, port, reuse_port=worker))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Every error of the file in one run, each with its path and line; exit 1 if any.

    A secret the machine does not have (a fresh clone, CI) is a warning and the rest is
    checked as if it were set, so a policy can be checked where it is written; ``--strict``
    makes it an error, as it is for ``serve``.
    """
    loaded = load_policy(args.file, secrets_required=args.strict)
    from proxy.chain import compile_chain

    try:
        compile_chain(loaded)
    except PolicyError as e:
        report_errors(args.file, e.errors, loaded.warnings)
        return 1
    report_errors(args.file, [], loaded.warnings)
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
    loaded = load_policy(args.policy)
    _hold_state_dir(loaded)
    from urllib.parse import urlsplit

    emu_urls = [p.base_url for p in loaded.policy.providers.values()]
    emu_port = urlsplit(emu_urls[0]).port or 9100 if emu_urls else 9100

    def banner(app: web.Application, port: int) -> None:
        from proxy.appkeys import GATEWAY

        keystore = app[GATEWAY].keystore
        chain = app[GATEWAY].runtime.chain
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
                data=_demo_data(loaded, chain, len(revoked)),
                exports=f"export TOLLWAY_ADMIN_KEY={admin} TOLLWAY_URL={base}",
                tollway=_tollway_command(),
                example=_demo_example(loaded, chain, base, key, args.tier),
            ),
            flush=True,
        )

    async def main() -> None:
        from proxy.emulator import create_emulator_app

        emu_runner, _ = await start_site(create_emulator_app(), "127.0.0.1", emu_port)
        try:
            await _run_gateway(loaded, args.host, args.port, banner)
        finally:
            await emu_runner.cleanup()

    run(main())
    return 0


_DEMO_USER = "demo"
_WIDTH = 96  # the banner's prose lines; commands are printed whole, to be pasted


def _told(hooks: tuple[Hook, ...]) -> dict[str, Any]:
    """What the chain's plugins tell about themselves through a describing hook
    (``cached_features``, ``data_files``), merged in chain order (the first plugin to name a
    key wins). Only for the demo's banner: a plugin whose answer fails is left out of it."""
    told: dict[str, Any] = {}
    for hook in hooks:
        try:
            answer = hook()
        except Exception:
            continue
        if isinstance(answer, Mapping):
            for k, v in answer.items():
                told.setdefault(str(k), v)
    return told


def _duration_text(seconds: float) -> str:
    """A duration as a policy writes it: the largest whole unit (``604800`` -> ``7d``)."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _demo_data(loaded: LoadedPolicy, chain: Chain, revoked: int) -> str:
    """Where the demo's keys and the plugins' data (``data_files``) are kept, and how to
    start over."""
    state = loaded.policy.state.dir
    earlier = f"; {revoked} earlier demo key(s) revoked" if revoked else ""
    if state is None:
        return f"keys are kept in memory only (state.dir: null){earlier}"
    files = "".join(f", {what} in {path}" for what, path in _told(chain.data_files).items())
    return (
        f"keys in {state}/keys.json{files}{earlier}\n"
        f"                          (stop the demo and delete these files to start from nothing)"
    )


def _tier_features(loaded: LoadedPolicy, tier: str) -> set[str]:
    """The features of a tier, with those of the tiers it ``includes``."""
    tiers, out, seen = loaded.policy.tiers, set(), set()
    name: str | None = tier
    while name is not None and name in tiers and name not in seen:
        seen.add(name)
        out.update(tiers[name].features)
        name = tiers[name].includes
    return out


def _demo_example(loaded: LoadedPolicy, chain: Chain, base: str, key: str, tier: str) -> str:
    """The curl example: ``model: auto`` when a plugin answers for a model of its own
    (``model_names``: routing's auto), and a feature a plugin caches (``cached_features``)
    within the demo key's tier, so the same request twice shows a hit."""
    policy = loaded.policy
    auto_name = next(iter(chain.model_names), None)
    model = auto_name or next(iter(policy.models), "gpt-5.4-mini")
    ttls = {
        f: _duration_text(float(t))
        for f, t in _told(chain.cached_features).items()
        if isinstance(t, int | float)
    }
    allowed = _tier_features(loaded, tier)
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
