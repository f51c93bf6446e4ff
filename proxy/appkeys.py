"""Typed aiohttp AppKeys: the application's shared objects, no string keys."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from proxy.gateway import Gateway
    from proxy.keystore import KeyStore
    from proxy.metrics import Metrics
    from proxy.shared import Shared

GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway")
KEYSTORE: web.AppKey[KeyStore] = web.AppKey("keystore")
SHARED: web.AppKey[Shared] = web.AppKey("shared")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
