"""Typed aiohttp AppKeys: the application's long-lived objects, no string keys."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from proxy.gateway import Gateway
    from proxy.keystore import KeyStore
    from proxy.metrics import Metrics
    from proxy.resources import Resources

GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway")
KEYSTORE: web.AppKey[KeyStore] = web.AppKey("keystore")
RESOURCES: web.AppKey[Resources] = web.AppKey("resources")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
