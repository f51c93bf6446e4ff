"""The pipelined Redis connection the request path uses (``proxy.resp``), against a real
redis-server, on asyncio's loop and on uvloop's (what ``tollway serve`` runs: its transports
are not asyncio's classes)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
import uvloop
from redis import exceptions

from proxy.resp import RespLink, Script, pack
from proxy.statewatch import is_state_error
from tests.conftest import free_port, redis_binary
from tests.procs import start_redis, stop_redis

LOOPS = ["asyncio", "uvloop"]


def run(kind: str, main: Callable[[], Awaitable[Any]]) -> Any:
    """``main()`` to its end on a fresh event loop of ``kind``."""
    if kind == "uvloop":
        return uvloop.run(main())
    return asyncio.run(main())  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", LOOPS)
def test_concurrent_calls_each_get_their_own_reply(kind: str, redis_url: str) -> None:
    """Hundreds of callers share the one connection; the replies come back in the order the
    commands were sent and each caller gets its own, whatever order the callers run in."""

    async def main() -> None:
        link = RespLink(redis_url)
        try:
            replies = await asyncio.gather(*(link.call(pack(b"ECHO", i)) for i in range(500)))
            assert replies == [str(i).encode() for i in range(500)]
            counts = await asyncio.gather(*(link.call(pack(b"INCR", b"n")) for _ in range(200)))
            assert sorted(counts) == list(range(1, 201))
        finally:
            await link.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_error_replies_raise_and_the_connection_goes_on(kind: str, redis_url: str) -> None:
    async def main() -> None:
        link = RespLink(redis_url)
        try:
            await link.call(pack(b"SET", b"s", b"text"))
            with pytest.raises(exceptions.ResponseError, match="WRONGTYPE") as caught:
                await link.call(pack(b"LPUSH", b"s", b"x"))
            assert not is_state_error(caught.value)  # a refused command, not an outage
            assert await link.call(pack(b"GET", b"s")) == b"text"
        finally:
            await link.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_a_pipeline_answers_in_order_and_raises_its_error_after_all(
    kind: str, redis_url: str
) -> None:
    async def main() -> None:
        link = RespLink(redis_url)
        try:
            replies = await link.pipeline(pack(b"SET", b"p", b"1"), pack(b"INCR", b"p"))
            assert replies == [b"OK", 2]
            with pytest.raises(exceptions.ResponseError, match="WRONGTYPE"):
                await link.pipeline(
                    pack(b"INCR", b"p"), pack(b"SADD", b"p", b"x"), pack(b"INCR", b"p")
                )
            assert await link.call(pack(b"GET", b"p")) == b"4"  # both INCRs ran; in order
        finally:
            await link.close()

    run(kind, main)


def test_a_script_is_loaded_again_when_redis_lost_it(redis_url: str) -> None:
    script = Script("return {KEYS[1], ARGV[1], 7}")
    command = script.command(1, 1, b"$1\r\nk\r\n$1\r\na\r\n")
    admin = redis.Redis.from_url(redis_url)

    async def main() -> None:
        link = RespLink(redis_url)
        try:
            assert await link.evalsha(script, command) == [b"k", b"a", 7]  # first call loads it
            admin.script_flush()
            with pytest.raises(exceptions.NoScriptError):
                await link.call(command)  # the plain call sees the server's NOSCRIPT
            assert await link.evalsha(script, command) == [b"k", b"a", 7]
        finally:
            await link.close()

    try:
        asyncio.run(main())
    finally:
        admin.close()


@pytest.mark.parametrize("kind", LOOPS)
def test_a_cancelled_caller_does_not_shift_the_replies(kind: str, redis_url: str) -> None:
    """A request whose client went away is cancelled while its command is in flight; its
    reply is dropped, and the next caller still gets its own."""

    async def main() -> None:
        link = RespLink(redis_url)
        try:
            await link.call(pack(b"PING"))  # connected
            gone = asyncio.ensure_future(link.call(pack(b"ECHO", b"gone")))
            await asyncio.sleep(0)
            await asyncio.sleep(0)  # sent (commands leave at the end of a pass of the loop)
            gone.cancel()
            assert await link.call(pack(b"ECHO", b"mine")) == b"mine"
            with contextlib.suppress(asyncio.CancelledError):
                await gone
        finally:
            await link.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_a_silent_server_times_out_and_its_connection_is_dropped(kind: str) -> None:
    """A server that takes a command and never answers: the call fails after the URL's
    timeout as an outage (``is_state_error``), and the next call opens a new connection, so a
    late reply on the old one can never answer another command."""

    async def main() -> None:
        connections: list[asyncio.StreamWriter] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(writer)
            first = len(connections) == 1
            while data := await reader.read(1024):
                if not first:  # the second connection answers every command
                    writer.write(b"+PONG\r\n" * data.count(b"*"))

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        link = RespLink(f"redis://127.0.0.1:{port}/0?socket_timeout=0.2")
        try:
            t0 = time.monotonic()
            with pytest.raises(exceptions.TimeoutError) as caught:
                await link.call(pack(b"PING"))
            assert 0.15 < time.monotonic() - t0 < 2.0
            assert is_state_error(caught.value)
            assert await link.call(pack(b"PING")) == b"PONG"
            assert len(connections) == 2
        finally:
            await link.close()
            server.close()
            for writer in connections:
                writer.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_a_server_that_is_not_redis_is_an_outage(kind: str) -> None:
    """``state.url`` pointing at something else (here an HTTP server's answer): the call
    fails as an outage and the connection is dropped, nothing is taken for a reply."""

    async def main() -> None:
        writers: list[asyncio.StreamWriter] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            await reader.read(1024)
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        link = RespLink(f"redis://127.0.0.1:{port}/0")
        try:
            with pytest.raises(exceptions.ConnectionError, match="not RESP") as caught:
                await link.call(pack(b"PING"))
            assert is_state_error(caught.value)
        finally:
            await link.close()
            for writer in writers:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            server.close()
            await server.wait_closed()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_unreachable_redis_is_an_outage(kind: str) -> None:
    async def main() -> None:
        link = RespLink(f"redis://127.0.0.1:{free_port()}/0")
        with pytest.raises(exceptions.ConnectionError) as caught:
            await link.call(pack(b"PING"))
        assert is_state_error(caught.value)

    run(kind, main)


@pytest.fixture
def own_redis() -> Any:
    """A redis-server of this test alone (it is stopped, restarted, given a password)."""
    binary = redis_binary()
    port = free_port()
    procs = [start_redis(binary, port)]

    def restart() -> None:
        stop_redis(procs[-1])
        procs.append(start_redis(binary, port))

    try:
        yield port, restart
    finally:
        stop_redis(procs[-1])


@pytest.mark.parametrize("kind", LOOPS)
def test_calls_in_flight_fail_when_redis_dies_and_the_next_reconnects(
    kind: str, own_redis: Any
) -> None:
    port, restart = own_redis

    async def main() -> None:
        link = RespLink(f"redis://127.0.0.1:{port}/0?socket_timeout=10")
        try:
            await link.call(pack(b"PING"))
            waiting = asyncio.ensure_future(link.call(pack(b"BLPOP", b"nothing", b"5")))
            await asyncio.sleep(0.1)
            await asyncio.to_thread(restart)  # killed with the call in flight
            with pytest.raises(exceptions.ConnectionError) as caught:
                await waiting
            assert is_state_error(caught.value)
            assert await link.call(pack(b"PING")) == b"PONG"
        finally:
            await link.close()

    run(kind, main)


def test_password_and_database_from_the_url(own_redis: Any) -> None:
    port, _ = own_redis
    with redis.Redis(port=port) as admin:
        admin.config_set("requirepass", "s3cret")

    async def main() -> None:
        wrong = RespLink(f"redis://:nope@127.0.0.1:{port}/0")
        with pytest.raises(exceptions.AuthenticationError) as caught:
            await wrong.call(pack(b"PING"))
        assert is_state_error(caught.value)  # as redis-py: an unusable state, not a bug
        link = RespLink(f"redis://default:s3cret@127.0.0.1:{port}/3")
        try:
            await link.call(pack(b"SET", b"where", b"db3"))
        finally:
            await link.close()

    asyncio.run(main())
    with redis.Redis(port=port, password="s3cret", db=3) as db3:
        assert db3.get("where") == b"db3"
