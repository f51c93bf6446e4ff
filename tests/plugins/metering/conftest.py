"""Helpers shared by the metering tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from plugins.metering.meter import build_meter_app, consume
from plugins.metering.stream import Meter
from proxy.policy import load_text
from tests.conftest import start_site


@asynccontextmanager
async def running_meter(policy_text: str) -> AsyncIterator[tuple[str, Meter]]:
    """``tollway meter``'s app and consumer thread, in this process: (its URL, the Meter)."""
    app, m = build_meter_app(load_text(policy_text))
    stop = threading.Event()
    thread = threading.Thread(target=consume, args=(m, stop))
    thread.start()
    runner, site = await start_site(app)
    try:
        yield site, m
    finally:
        await runner.cleanup()
        stop.set()
        await asyncio.to_thread(thread.join)
        m.close()
        m.db.close()
