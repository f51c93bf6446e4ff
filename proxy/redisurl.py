"""One spelling of a Redis URL's read timeout for every Redis client in the gateway.

The cache documents ``?timeout=`` (aiocache's name) and ``proxy.resp`` accepts it, but
redis-py's ``from_url`` passes unknown query parameters to its connection class, which raises
``TypeError`` for ``timeout``: a ``state.url`` written as the cache's docs say broke the key
sync, the state watch and the limits' storage. Every client is built from ``redis_url(url)``.

Every client also gets a connect and a read timeout (``TIMEOUT`` unless the URL names its
own, ``timeouts``): without one, a Redis that stops answering with its connections open (a
frozen process, a host gone without a reset) stalls each call for as long as the kernel keeps
the connection, so a request waiting on the quota ledger or a key sync hung instead of being
served per ``state.on_unavailable``.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit

TIMEOUT = 1.0
"""Seconds a Redis client waits to connect, and for a reply, unless its URL says otherwise."""


def redis_url(url: str) -> str:
    """``url`` with ``timeout`` spelled ``socket_timeout`` (an explicit ``socket_timeout``
    wins); any other URL unchanged."""
    parts = urlsplit(url)
    if "timeout" not in parts.query:
        return url
    query = parse_qsl(parts.query, keep_blank_values=True)
    names = {k for k, _ in query}
    out = []
    for k, v in query:
        if k == "timeout":
            if "socket_timeout" in names:
                continue
            k = "socket_timeout"
        out.append((k, v))
    return parts._replace(query=urlencode(out)).geturl()


def timeouts(url: str, default: float = TIMEOUT) -> dict[str, float]:
    """The ``socket_timeout`` and ``socket_connect_timeout`` keyword arguments of a client of
    ``url``: the URL's own (``timeout``, ``socket_timeout``, ``socket_connect_timeout``) where
    it names them, else ``default``; the connect timeout follows the read timeout unless
    named, as in ``proxy.resp``. (redis-py lets URL options override keyword arguments, so
    this only matters where the URL is silent; it is computed here so every client agrees.)"""
    query = dict(parse_qsl(urlsplit(url).query))
    given = query.get("socket_timeout") or query.get("timeout")
    read = float(given) if given else default
    connect = query.get("socket_connect_timeout")
    return {
        "socket_timeout": read,
        "socket_connect_timeout": float(connect) if connect else read,
    }
