"""The floor for a Python proxy: a bare aiohttp pass-through with no policy, no parsing.

The benchmark compares Tollway with this, not only with a direct call, because a Python
reverse proxy pays for two HTTP parses, an extra hop and the event loop no matter what it does;
what Tollway adds on top of *that* is the cost its features must justify. It runs the way the
gateway runs (uvloop, ``AppRunner(access_log=None)``, one pooled session with no connection cap)
so the comparison is like for like.

    python bench/bare_proxy.py --upstream http://127.0.0.1:9100 --port 0
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

# Framing and hop-by-hop headers that aiohttp sets itself on each side.
_SKIP = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive"})


def create_app(upstream: str) -> web.Application:
    """A catch-all route forwarding method, path, query, headers and body to ``upstream``."""
    app = web.Application(client_max_size=1 << 31)
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        # limit=0 like the gateway: the pool must not be what caps concurrency.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        app[session_key] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        yield
        await app[session_key].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP}
        async with app[session_key].request(
            request.method, upstream + request.path_qs, headers=headers, data=await request.read()
        ) as up:
            out = {k: v for k, v in up.headers.items() if k.lower() not in _SKIP}
            if not up.headers.get("content-type", "").startswith("text/event-stream"):
                return web.Response(status=up.status, body=await up.read(), headers=out)
            resp = web.StreamResponse(status=up.status, headers=out)
            await resp.prepare(request)
            async for chunk in up.content.iter_any():  # relay each piece as it arrives
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def serve(upstream: str, host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT; prints the bound port so the bench can use ``--port 0``."""
    runner = web.AppRunner(create_app(upstream.rstrip("/")), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    await site.start()
    print(f"bare proxy listening on http://{host}:{runner.addresses[0][1]}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9100")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.upstream, args.host, args.port))
        return
    try:
        uvloop.run(serve(args.upstream, args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
