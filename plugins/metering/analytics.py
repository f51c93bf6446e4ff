"""Admin SQL, invoices and exports over the usage database: on threads of their own, bounded.

An admin query is arbitrary: ``SELECT count(*) FROM range(1000000000) a, range(1000000000) b``
never ends by itself. So that no query can stop the admin plane, the gateway or its shutdown:

- queries run on an executor of their own (never the loop's default one, which other work
  such as quota persistence uses, nor the loader's thread), at a lower CPU priority than
  requests; at most ``concurrency`` run at once, and one more is refused at once (QueryBusy)
  rather than queued behind them;
- each has a time limit, enforced by interrupting DuckDB from the event loop; leaving (the
  HTTP client disconnects, the handler is cancelled) interrupts it too;
- answers are capped in rows and bytes (ResultTooLarge), and each query's intermediates in
  memory (DuckDB's operator_memory_limit; spills to disk are capped for the database);
- invoices and exports have executors of their own, so hostile queries never delay them;
- ``stop_all`` (when a shutdown begins) stops every running call, which answers at once
  (ShuttingDown), and refuses new ones; ``close`` interrupts whatever still runs and waits
  only briefly for it.

DuckDB resets a connection's interrupt flag when a query starts, so an interrupt sent just
before ``execute`` would be lost: it is repeated until the worker thread returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from proxy.analytics import QueryBusy, QueryTimeout, ShuttingDown, export_target

if TYPE_CHECKING:
    from collections.abc import Mapping

    from plugins.metering.billing import PlanTerms
    from plugins.metering.database import UsageDB

log = logging.getLogger("tollway.analytics")

T = TypeVar("T")

REINTERRUPT_EVERY = 0.02
"""Seconds between two interrupts of a cancelled query, until its thread returns."""

STOP_GRACE = 1.0
"""Seconds a timed-out query's answer waits for its interrupted thread to return."""


def lowest_priority() -> None:
    """Give the calling thread the lowest CPU priority there is (Linux: a thread is a task).

    An admin query may keep a core busy for its whole time limit; at nice 19 (CFS weight 15
    against the event loop's 1024) it runs on CPU the gateway leaves idle, so requests keep
    their latency, yet it still progresses under load (no starvation while it holds one of
    DuckDB's locks that the loader needs too).
    """
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


@dataclass(frozen=True, slots=True)
class QueryLimits:
    """The bounds of admin SQL; their defaults and meaning are in the metering config."""

    timeout: float
    max_rows: int
    max_bytes: int
    concurrency: int
    memory_limit: str


class _Cancelled(Exception):
    """The call was cancelled before it reached DuckDB."""


class _Running:
    """One call in a worker thread: its cursor, so the event loop can interrupt it."""

    __slots__ = ("_lock", "cancelled", "cursor")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.cursor: Any = None
        self.cancelled = False

    def attach(self, cursor: Any) -> None:
        with self._lock:
            if self.cancelled:
                raise _Cancelled
            self.cursor = cursor

    def detach(self) -> None:
        with self._lock:
            self.cursor = None

    def interrupt(self) -> None:
        with self._lock:
            self.cancelled = True
            if self.cursor is not None:
                self.cursor.interrupt()


class Analytics:
    """The admin plane's access to a UsageDB (a gateway's or ``tollway meter``'s)."""

    def __init__(
        self,
        db: UsageDB,
        limits: QueryLimits,
        export_dir: str | Path,
        initializer: Callable[[], None] | None = lowest_priority,
    ) -> None:
        self.db = db
        self.limits = limits
        self.export_dir = Path(export_dir)
        self._queries = ThreadPoolExecutor(
            limits.concurrency, thread_name_prefix="tollway-sql", initializer=initializer
        )
        self._invoices = ThreadPoolExecutor(
            2, thread_name_prefix="tollway-invoice", initializer=initializer
        )
        self._exports = ThreadPoolExecutor(
            1, thread_name_prefix="tollway-export", initializer=initializer
        )
        self._queries_running = 0
        self._active: dict[_Running, asyncio.Future[Any]] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self.stopping = False  # a shutdown began: calls are stopped and refused
        self.queries = 0  # started (past check_capacity); the meter's /metrics counts them
        self.timeouts = 0
        self.refused = 0

    # ---- the calls --------------------------------------------------------------------

    def check_capacity(self) -> None:
        """Raise QueryBusy when every query slot is taken (cheap: call it before any work)."""
        if self._queries_running >= self.limits.concurrency:
            self.refused += 1
            raise QueryBusy(
                f"{self.limits.concurrency} analytics queries are running (query_concurrency); "
                "try again when one ends"
            )

    async def sql(self, query: str) -> tuple[list[str], list[list[Any]]]:
        self.check_capacity()
        self.queries += 1
        lim = self.limits
        try:
            return await self._submit(
                self._queries,
                lim.timeout,
                self.db.query,
                query,
                max_rows=lim.max_rows,
                max_bytes=lim.max_bytes,
                memory_limit=lim.memory_limit,
                slot=True,
            )
        except QueryTimeout:
            self.timeouts += 1
            raise QueryTimeout(
                f"the query ran longer than {lim.timeout:g}s (query_timeout) and was stopped"
            ) from None

    async def invoice(
        self,
        user: str,
        month: str,
        tier_costs: dict[str, float],
        current: str | None,
        terms: Mapping[str, PlanTerms] | None = None,
    ) -> dict[str, Any]:
        return await self._submit(
            self._invoices, None, self.db.invoice, user, month, tier_costs, current, terms
        )

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """A fixed, parameterised read of the gateway's own (a key holder's usage page):
        ``fn(*args, cur=...)`` on the invoices' threads (so admin queries never delay it),
        stopped after ``query_timeout`` like an admin query (QueryTimeout)."""
        return await self._submit(self._invoices, self.limits.timeout, fn, *args)

    async def export_parquet(self, name: str) -> tuple[str, int]:
        folder = export_target(self.export_dir, name)  # InvalidExportPath: the caller's 400
        rows = await self._submit(self._exports, None, self.db.export_parquet, folder)
        return str(folder), rows

    # ---- threads, time limits, cancellation -------------------------------------------

    async def _submit(
        self,
        pool: ThreadPoolExecutor,
        limit: float | None,
        fn: Callable[..., T],
        *args: Any,
        slot: bool = False,
        **kwargs: Any,
    ) -> T:
        """Run ``fn(*args, cur=<a cursor of its own>, **kwargs)`` on ``pool``; interrupt it
        after ``limit`` seconds or when cancelled. ``slot``: a query slot is held until the
        thread returns (not merely until this coroutine does), so the cap counts what runs."""
        if self.stopping:
            raise ShuttingDown("the server is shutting down; retry on another instance")
        running = _Running()
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(pool, self._call, running, fn, args, kwargs)
        self._active[running] = fut
        if slot:
            self._queries_running += 1  # no await since check_capacity: the cap holds

        def done(f: asyncio.Future[Any]) -> None:
            self._active.pop(running, None)
            if slot:
                self._queries_running -= 1
            if not f.cancelled():
                f.exception()  # retrieved: an abandoned call's error is not logged as lost

        fut.add_done_callback(done)
        try:
            if limit is None:
                return await asyncio.shield(fut)
            return await asyncio.wait_for(asyncio.shield(fut), limit)
        except TimeoutError:
            self._stop(running, fut)
            # an interrupt takes effect within milliseconds: answer once the thread is back,
            # so a client that retries at once finds its slot free
            await asyncio.wait({fut}, timeout=STOP_GRACE)
            raise QueryTimeout("the query was stopped") from None
        except asyncio.CancelledError:
            self._stop(running, fut)
            raise
        except Exception:
            if self.stopping:  # interrupted by stop_all: not the query's fault
                raise ShuttingDown("the server is shutting down; the call was stopped") from None
            raise

    def _call(
        self, running: _Running, fn: Callable[..., T], args: tuple[Any, ...], kw: dict[str, Any]
    ) -> T:
        cur = self.db.con.cursor()
        try:
            running.attach(cur)
            return fn(*args, cur=cur, **kw)
        except _Cancelled:
            raise QueryTimeout("the query was stopped before it started") from None
        finally:
            running.detach()
            cur.close()

    def _stop(self, running: _Running, fut: asyncio.Future[Any]) -> None:
        running.interrupt()
        task = asyncio.get_running_loop().create_task(self._reinterrupt(running, fut))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    @staticmethod
    async def _reinterrupt(running: _Running, fut: asyncio.Future[Any], limit: float = 5.0) -> None:
        deadline = time.monotonic() + limit
        while not fut.done() and time.monotonic() < deadline:
            running.interrupt()
            await asyncio.sleep(REINTERRUPT_EVERY)

    def stop_all(self) -> None:
        """A shutdown begins: stop every running call, so its request answers at once
        (ShuttingDown) instead of holding the shutdown, and refuse new ones. Each call is
        interrupted until its thread returns, not once (an interrupt sent just before DuckDB
        starts a query would be lost)."""
        self.stopping = True
        for running, fut in list(self._active.items()):
            self._stop(running, fut)

    def interrupt_all(self) -> None:
        """Interrupt every call running now, once (``close`` repeats it until they return)."""
        for running in list(self._active):
            running.interrupt()

    async def close(self, grace: float = 2.0) -> None:
        """Interrupt every call still running and give the threads ``grace`` seconds to
        return; the pools are shut down without waiting, so shutdown never hangs on them."""
        pending = list(self._active.items())
        self.interrupt_all()
        if pending:
            futures = [f for _, f in pending]
            deadline = time.monotonic() + grace
            while not all(f.done() for f in futures) and time.monotonic() < deadline:
                for running, _ in pending:
                    running.interrupt()
                await asyncio.sleep(REINTERRUPT_EVERY)
            if not all(f.done() for f in futures):
                log.warning("analytics calls still running at shutdown were left behind")
        for task in list(self._watchers):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for pool in (self._queries, self._invoices, self._exports):
            pool.shutdown(wait=False, cancel_futures=True)

    @property
    def busy(self) -> bool:
        """Whether any call still runs (the database must not close under it)."""
        return bool(self._active)
