"""A lean Redis connection for the calls a request waits on: one socket, commands pipelined.

Why not redis-py's asyncio client there: measured on the bench machine, one EVALSHA through
it cost the gateway 50-70 µs of CPU (a pool checkout under a lock, a timeout context and a
stream read per command, the command packed argument by argument, retry and observability
wrappers), which made a gateway with ``state.url: redis://`` use ~1.46x the CPU per request
of one in memory (``bench/results-instances.md``). Here the caller hands over a command
already packed (the limits plugin packs a caller's layers once, ``Script.command``), it joins
the others written in the same pass of the event loop (one ``write`` for all of them), and the
replies, parsed by hiredis in the order the commands were sent, each resolve their caller's
future, so under load one read answers several requests. That is a few µs a call with many
in flight; one call alone costs what the event loop needs to send it and wake up for the
reply.

Failures are redis-py's exception types, so ``proxy.statewatch.is_state_error`` and callers
treat them as before: ``ConnectionError`` when the connection cannot be opened or breaks
(every pending call fails; the next call opens a new connection), ``TimeoutError`` when the
oldest pending reply is later than the timeout (the connection is dropped with every call on
it: a late reply can never be taken for another command's), ``AuthenticationError`` for a
refused password, ``BusyLoadingError`` while Redis loads its data, ``ResponseError`` for any
other error reply (``NoScriptError`` for NOSCRIPT, which ``evalsha`` answers by loading the
script and calling again). The URL means what it means to redis-py
(``redis.asyncio.connection.parse_url``): host, port, db, username, password, ``rediss://``
with its ``ssl_*`` options, ``socket_timeout`` (or ``timeout``, the cache's name for it) and
``socket_connect_timeout`` in seconds (default: the ``timeout`` it is built with).

Everything a request does not wait on (key sync, the state watch, the metering stream, cold
quota calls) keeps redis-py, whose pool and retries suit it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections import deque
from typing import Any, cast

import hiredis
from redis import exceptions
from redis.asyncio.connection import parse_url

DEFAULT_TIMEOUT = 1.0
"""Seconds a reply (or opening the connection) may take when the URL sets no timeout."""

_ERRORS: dict[str, type[exceptions.RedisError]] = {
    "NOSCRIPT": exceptions.NoScriptError,
    "LOADING": exceptions.BusyLoadingError,
    "NOAUTH": exceptions.AuthenticationError,
    "WRONGPASS": exceptions.AuthenticationError,
}
"""Error replies by their first word, as redis-py raises them."""


def bulk(value: bytes) -> bytes:
    """One RESP bulk string: a command's argument as it goes on the wire."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def pack(*args: bytes | str | int) -> bytes:
    """A whole command (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        parts.append(bulk(a if isinstance(a, bytes) else str(a).encode()))
    return b"".join(parts)


class Script:
    """A Lua script called by its SHA1 (EVALSHA); ``RespLink.evalsha`` loads it again when
    the server lost it (a restart, SCRIPT FLUSH)."""

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()
        self.load = pack(b"SCRIPT", b"LOAD", self.source)
        self._head = bulk(b"EVALSHA") + bulk(self.sha)

    def command(self, n_keys: int, n_args: int, packed: bytes) -> bytes:
        """EVALSHA of ``n_keys`` keys then ``n_args`` arguments, all already in ``packed``
        as bulk strings (``bulk``): a caller can pack its constant part once."""
        return b"*%d\r\n%s%s%s" % (3 + n_keys + n_args, self._head, bulk(b"%d" % n_keys), packed)


def _error(reply: exceptions.ResponseError) -> exceptions.RedisError:
    message = str(reply)
    kind = _ERRORS.get(message.split(" ", 1)[0])
    return kind(message) if kind is not None else reply


class _Protocol(asyncio.Protocol):
    """One open connection: commands in flight, in the order they were sent."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.reader = hiredis.Reader(replyError=exceptions.ResponseError)
        self.pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.out: list[bytes] = []  # commands to write at the end of this pass of the loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        pending = self.pending
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError:
                self.fail(exceptions.ConnectionError("Redis sent something that is not RESP"))
                return
            if reply is False:  # no complete reply left
                return
            if not pending:  # a reply nobody asked for: the stream cannot be trusted
                self.fail(exceptions.ConnectionError("unexpected reply from Redis"))
                return
            future = pending.popleft()[0]
            if future.done():  # its caller was cancelled (the client went away)
                continue
            if isinstance(reply, exceptions.ResponseError):
                future.set_exception(_error(reply))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(exceptions.ConnectionError(f"Redis connection lost: {exc or 'closed'}"))

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """Queue ``command``; its reply resolves the future. Commands queued in one pass of
        the event loop leave in one write."""
        if self.closed:
            raise exceptions.ConnectionError("Redis connection closed")
        future = self.loop.create_future()
        if not self.out:
            self.loop.call_soon(self._flush)
        self.out.append(command)
        self.pending.append((future, self.loop.time()))
        if self.watchdog is None:
            self.watchdog = self.loop.call_later(self.timeout, self._watch)
        return future

    def _flush(self) -> None:
        out, self.out = self.out, []
        if not self.closed and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _watch(self) -> None:
        """Runs at most once per timeout while calls are pending: the oldest one late?"""
        self.watchdog = None
        if not self.pending or self.closed:
            return
        left = self.pending[0][1] + self.timeout - self.loop.time()
        if left <= 0:
            self.fail(exceptions.TimeoutError(f"no reply from Redis within {self.timeout:g}s"))
            return
        self.watchdog = self.loop.call_later(left, self._watch)

    def fail(self, exc: exceptions.RedisError) -> None:
        """Close the connection; every call in flight raises ``exc``."""
        self.closed = True
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        if self.transport is not None:
            with contextlib.suppress(Exception):  # its loop may be closed already
                self.transport.abort()
        while self.pending:
            future = self.pending.popleft()[0]
            if not future.done():
                future.set_exception(exc)


class RespLink:
    """One pipelined connection to the Redis of ``url``, opened on first use and again after
    a failure; see the module docstring."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        opts: dict[str, Any] = dict(parse_url(url))
        self.host: str = opts.get("host") or "localhost"
        self.port = int(opts.get("port") or 6379)
        self.db = int(opts.get("db") or 0)
        self.username: str | None = opts.get("username")
        self.password: str | None = opts.get("password")
        given = opts.get("socket_timeout") or opts.get("timeout")
        self.timeout = float(given) if given else timeout
        connect = opts.get("socket_connect_timeout")
        self.connect_timeout = float(connect) if connect else self.timeout
        self.ssl = _ssl_context(opts) if "connection_class" in opts else None
        self._proto: _Protocol | None = None
        self._opening: asyncio.Task[_Protocol] | None = None

    async def call(self, command: bytes) -> Any:
        """Send a packed command (``pack``) and return its reply."""
        proto = self._proto
        if proto is None or proto.closed or proto.loop is not asyncio.get_running_loop():
            proto = await self._connect()
        return await proto.send(command)

    async def pipeline(self, *commands: bytes) -> list[Any]:
        """Send ``commands`` together (one write) and return their replies in order; an
        error reply (or a failure) is raised once every reply is in."""
        proto = self._proto
        if proto is None or proto.closed or proto.loop is not asyncio.get_running_loop():
            proto = await self._connect()
        replies = await asyncio.gather(*map(proto.send, commands), return_exceptions=True)
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies

    async def evalsha(self, script: Script, command: bytes) -> Any:
        """Run ``command`` (``script.command(...)``), loading the script first if the server
        does not have it."""
        try:
            return await self.call(command)
        except exceptions.NoScriptError:
            await self.call(script.load)
            return await self.call(command)

    async def _connect(self) -> _Protocol:
        """The open connection: callers arriving while it opens wait for the same one."""
        loop = asyncio.get_running_loop()
        task = self._opening
        if task is None or task.get_loop() is not loop:
            task = self._opening = loop.create_task(self._open(loop))
        try:
            return await asyncio.shield(task)
        finally:
            if task.done() and self._opening is task:
                self._opening = None

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Protocol:
        old, self._proto = self._proto, None
        if old is not None and not old.closed:  # opened on another event loop
            old.fail(exceptions.ConnectionError("Redis connection replaced"))
        proto: _Protocol | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: _Protocol(loop, self.timeout), self.host, self.port, ssl=self.ssl
                )
                hello = []
                if self.password is not None:
                    user = [self.username] if self.username else []
                    hello.append(proto.send(pack(b"AUTH", *user, self.password)))
                if self.db:
                    hello.append(proto.send(pack(b"SELECT", self.db)))
                for reply in hello:
                    await reply
        except OSError as e:  # refused, unreachable, timed out (TimeoutError), TLS
            if proto is not None:
                proto.fail(exceptions.ConnectionError("Redis connection failed"))
            raise exceptions.ConnectionError(
                f"cannot connect to Redis at {self.host}:{self.port}: {e or type(e).__name__}"
            ) from None
        except exceptions.RedisError:
            assert proto is not None
            proto.fail(exceptions.ConnectionError("Redis connection failed"))
            raise
        self._proto = proto
        return proto

    async def close(self) -> None:
        """Drop the connection; calls in flight raise ``ConnectionError``."""
        proto, self._proto = self._proto, None
        if proto is not None and not proto.closed:
            proto.fail(exceptions.ConnectionError("Redis connection closed"))


def _ssl_context(opts: dict[str, Any]) -> ssl.SSLContext:
    """``rediss://``: verified against the system's CAs (or ``ssl_ca_certs``) unless
    ``ssl_cert_reqs=none``, with a client certificate if ``ssl_certfile`` names one."""
    context = ssl.create_default_context(cafile=opts.get("ssl_ca_certs"))
    reqs = opts.get("ssl_cert_reqs")
    if isinstance(reqs, str):
        reqs = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL}.get(
            reqs.lower(), ssl.CERT_REQUIRED
        )
    if reqs is not None and reqs != ssl.CERT_REQUIRED:
        context.check_hostname = False
        context.verify_mode = reqs
    elif opts.get("ssl_check_hostname") is False:
        context.check_hostname = False
    if opts.get("ssl_certfile"):
        context.load_cert_chain(opts["ssl_certfile"], opts.get("ssl_keyfile"))
    return context
