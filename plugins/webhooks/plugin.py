"""webhooks: business events (budget and quota thresholds, keys about to expire) as signed
JSON POSTs to the receivers the policy names, each delivered once, never on the request path.

The plugin implements no request hook: in ``lifespan`` it subscribes its outbox
(``plugins.webhooks.outbox``) to the application's event bus (``proxy.events``), and the
plugins that notice thresholds (limits, budgets, keys) emit there. Its place in ``chain:`` does
not matter. See docs/plugins.md#webhooks for the receiver's side.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from plugins.webhooks.claims import RedisClaims
from plugins.webhooks.config import WebhooksConfig
from plugins.webhooks.journal import Journal
from plugins.webhooks.outbox import Outbox
from proxy.appkeys import METRICS, RESOURCES
from proxy.context import StashKey
from proxy.events import EVENTS, Event, EventBus
from proxy.figures import Card, Figures
from proxy.hookspecs import hookimpl
from proxy.policy import Policy
from proxy.statedir import instance_id
from proxy.statewatch import STATE_WATCH

OUTBOX: StashKey[Outbox] = StashKey()


class WebhooksPlugin:
    """Delivers the event bus's events to the configured endpoints."""

    Config = WebhooksConfig

    def __init__(self, config: WebhooksConfig, policy: Policy) -> None:
        self.config = config
        state = policy.state
        self.state_dir = Path(state.dir) if state.dir else None
        self.redis_url = state.url if state.distributed else None
        self.outbox: Outbox | None = None

    def _open(self, resources: Any) -> Outbox:
        """The application's one outbox (kept across reloads), its file and its claims."""
        c = self.config
        path = self.state_dir / c.queue_file if self.state_dir and c.queue_file else None
        claims = None
        watch = resources.find(STATE_WATCH)
        if self.redis_url is not None:
            claims = RedisClaims(
                self.redis_url, instance_id(self.state_dir), c.keep_delivered, watch, c.lease
            )
        outbox = Outbox(c, Journal(path, c.keep_delivered), claims)
        if claims is not None and watch is not None:
            watch.on_recover(outbox.reseed)
        resources.on_close(outbox.close)
        return outbox

    @hookimpl
    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        resources = app[RESOURCES]
        outbox = resources.find(OUTBOX)
        if outbox is None:
            outbox = self._open(resources)
            resources.put(OUTBOX, outbox)
            await outbox.start()
        else:
            outbox.configure(self.config)  # a reload: new endpoints, the same queue
        self.outbox = outbox
        app[METRICS].add("webhooks", outbox.metrics)

        def subscriber(event: Event) -> None:  # one per chain: a reload's removes only its own
            outbox.offer(event)

        unsubscribe = resources.get(EVENTS, EventBus).subscribe(subscriber)
        try:
            yield
        finally:
            unsubscribe()

    @hookimpl
    async def dashboard_figures(self) -> Figures | None:
        if self.outbox is None:
            return None
        stats = self.outbox.stats()
        return Figures(
            cards=(Card("webhooks_pending", "Webhooks owed", stats["pending"]),),
            sections={"webhooks": stats},
        )
