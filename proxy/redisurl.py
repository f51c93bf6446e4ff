"""One spelling of a Redis URL's read timeout for every Redis client in the gateway.

The cache documents ``?timeout=`` (aiocache's name) and ``proxy.resp`` accepts it, but
redis-py's ``from_url`` passes unknown query parameters to its connection class, which raises
``TypeError`` for ``timeout``: a ``state.url`` written as the cache's docs say broke the key
sync, the state watch and the limits' storage. Every client is built from ``redis_url(url)``.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit


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
