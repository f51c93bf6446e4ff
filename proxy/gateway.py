"""Gateway: the long-lived state of a running server and the atomic policy swap.

A reload compiles and starts the new chain first; only a chain that started is swapped in (one
attribute assignment, atomic for the event loop). The old chain is retired: requests already
running finish on it, and its plugins are closed when its last request ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.chain import Chain, compile_chain
from proxy.dashboard import CpuMeter
from proxy.keystore import KeyStore
from proxy.keysync import KeySync
from proxy.metrics import Metrics
from proxy.policy import LoadedPolicy, PolicyError, read_file
from proxy.runtime import Runtime

log = logging.getLogger("tollway")


class Gateway:
    """Holds the current Runtime, the pooled upstream session and the key store."""

    def __init__(
        self,
        runtime: Runtime,
        keystore: KeyStore,
        extra_plugins: dict[str, Callable[..., Any]] | None = None,
    ) -> None:
        self.runtime = runtime
        self.keystore = keystore
        self.keysync: KeySync | None = None  # issued keys shared through Redis
        self.extra_plugins = extra_plugins
        self.session: aiohttp.ClientSession | None = None
        self.metrics = Metrics()
        self.started = time.monotonic()
        self.cpu = CpuMeter()  # the dashboard's and autoscalers' CPU figure
        self.app: web.Application | None = None
        self.ready = False
        self.reloads = 0
        # the plugin routes registered at start (aiohttp's router is fixed once it serves)
        self.route_keys: frozenset[tuple[str, str]] = frozenset()
        self._retired: set[Chain] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    async def reload(self, loaded: LoadedPolicy | None = None) -> Runtime:
        """Swap in a new policy (re-read from its file when ``loaded`` is None).

        Raises PolicyError with every problem; the old policy keeps serving in that case.
        """
        async with self._lock:
            if loaded is None:
                path = self.runtime.loaded.path
                if path is None:
                    raise PolicyError(["this gateway was not started from a policy file"])
                loaded = read_file(Path(path))  # compile_chain reports all errors at once
            chain = compile_chain(loaded, extra_plugins=self.extra_plugins)
            assert self.app is not None
            await chain.start(self.app)
            old = self.runtime
            self.runtime = Runtime.build(loaded, chain)
            self.reloads += 1
            old.chain.retired = True
            if old.chain.in_flight == 0:
                self.retire(old.chain)
            else:
                self._retired.add(old.chain)
            log.info("policy reloaded (%d plugins)", len(chain.plugins))
            for key in sorted(set(chain.routes) - self.route_keys):
                log.warning(
                    "plugin %s adds route %s %s: served after a restart",
                    chain.routes[key].plugin,
                    *key,
                )
            return self.runtime

    def retire(self, chain: Chain) -> None:
        """Close a retired chain's plugins in the background (called when it goes idle)."""
        self._retired.discard(chain)
        task = asyncio.get_running_loop().create_task(chain.stop())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for chain in list(self._retired):
            await chain.stop()
        self._retired.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.runtime.chain.stop()
