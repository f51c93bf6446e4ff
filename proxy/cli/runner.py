"""Running a server from a ``tollway`` command: the core's public API for command plugins.

``tollway serve`` and ``demo`` are built on these, and so is a plugin's own server (the
metering plugin's ``tollway meter``): a command added through ``register_commands`` reads its
policy with :func:`load_policy`, binds its aiohttp application with :func:`start_site` inside a
coroutine, and runs that coroutine with :func:`run`. Each failure a user can cause (a policy
with errors, a taken port, a plugin that cannot start) ends the command with exit status 1 and
a message, never a traceback, the same way for every command.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from proxy.policy import Listen, LoadedPolicy, PolicyError, read_file
from proxy.server import GatewayRunner


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` to its end on uvloop when it is installed (faster sockets), else on
    asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)


def load_policy(path: str, *, secrets_required: bool = True) -> LoadedPolicy:
    """Read a policy file; exit 1 printing every error of it, its chain's included.

    ``secrets_required=False`` reports a secret this machine does not have as a warning
    (``tollway check``); a command that serves needs them all.
    """
    try:
        loaded = read_file(path, secrets_required=secrets_required)
    except PolicyError as e:
        report_errors(path, e.errors, [])
        raise SystemExit(1) from None
    if loaded.errors:
        from proxy.chain import check_chain  # plugins are imported only where they are used

        report_errors(path, check_chain(loaded), loaded.warnings)
        raise SystemExit(1)
    return loaded


def report_errors(path: str, errors: list[str], warnings: list[str]) -> None:
    """Print a policy's errors (one per line, each with its path and line) and warnings to
    stderr, as ``tollway check`` does."""
    if errors:
        print(f"{path}: invalid policy", file=sys.stderr)
    for line in errors:
        print(f"  {line}", file=sys.stderr)
    for line in warnings:
        print(f"  warning: {line}", file=sys.stderr)


async def start_site(
    app: web.Application,
    host: str,
    port: int,
    listen: Listen | None = None,
    *,
    reuse_port: bool = False,
) -> tuple[web.AppRunner, int]:
    """Set up ``app`` and bind it; return its runner (``await runner.cleanup()`` stops it) and
    the port bound (``port`` 0 picks a free one). A failure (a plugin that cannot start, a
    taken port) is one line on stderr and exit status 1.

    With ``listen`` (the gateway, not the demo's emulator) connections get the policy's header
    deadline and JSON protocol errors (proxy/server.py), and in-flight requests get
    ``shutdown_timeout`` to finish when the runner is cleaned up. ``reuse_port``: several
    processes bind the same port and the kernel spreads connections over them
    (``SO_REUSEPORT``; the workers of ``tollway serve --workers``).
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
        site = web.TCPSite(
            runner, host, port, backlog=4096, reuse_address=True, reuse_port=reuse_port or None
        )
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
