"""The network edge: request ids, slow or idle connections, OPTIONS, oversized headers, the
gateway's own replies, and a bounded shutdown.

Connection-level behaviour (header deadline, protocol errors, SIGTERM) belongs to how
`tollway serve` runs the app, so those tests drive the real command as a subprocess; the rest
use in-process gateways over real HTTP.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from proxy.handler import new_request_id
from tests.conftest import ADMIN_KEY, Gw, free_port
from tests.procs import TOLLWAY, Http, Proc, running, wait_for
from tests.security import rawhttp
from tests.security.helpers import static_key_policy

REQUEST_ID = re.compile(r"^req_[0-9a-f]{24}$")
KEY = "tw_network_test_key"


def _policy(tmp: Path, emu: int, **listen: str) -> tuple[Path, int]:
    values = {"header_timeout": "500ms", "keepalive_timeout": "3s", "shutdown_timeout": "10s"}
    values.update(listen)
    return static_key_policy(tmp, KEY, f"http://127.0.0.1:{emu}/v1", **values)


@pytest.fixture(scope="module")
def emulator_port() -> Iterator[int]:
    port = free_port()
    with running([*TOLLWAY, "emulator", "--port", str(port)], "emulator listening"):
        yield port


@pytest.fixture(scope="module")
def served(
    emulator_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[int, Proc]]:
    """`tollway serve` with header_timeout 0.5s and keepalive_timeout 3s: (port, process)."""
    policy, port = _policy(tmp_path_factory.mktemp("net"), emulator_port)
    with running([*TOLLWAY, "serve", "--policy", str(policy)], "tollway listening") as proc:
        yield port, proc


# ---- request ids ----------------------------------------------------------------------


def test_request_ids_are_random_not_a_counter() -> None:
    ids = [new_request_id() for _ in range(2000)]
    assert all(REQUEST_ID.match(i) for i in ids), ids[:3]
    assert len(set(ids)) == len(ids)
    values = [int(i[4:], 16) for i in ids]
    # a counter (even behind a random prefix) differs by 1 from one id to the next; 96 random
    # bits differ by less than 2**64 with probability 2**-32 per pair
    assert all(abs(a - b) > 2**64 for a, b in itertools.pairwise(values))
    # and no fixed prefix (the old ids shared one per process): the first 24 bits vary too
    assert len({i[4:10] for i in ids}) > 1900


def test_a_forked_process_does_not_repeat_its_parents_ids() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, then leave without running any cleanup
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 100).decode()
    os.close(read)
    assert REQUEST_ID.match(child)
    assert child != new_request_id()


async def test_every_reply_of_the_gateway_carries_a_request_id(gw: Gw, key: str) -> None:
    big = b"{" + b" " * (11 * 1024 * 1024) + b"}"
    auth = {"Authorization": f"Bearer {key}"}
    json_auth = {**auth, "Content-Type": "application/json"}
    cases = [
        ("GET", "/healthz", {}, None, 200),
        ("GET", "/v1/models", auth, None, 200),
        ("GET", "/nope", {}, None, 404),
        ("GET", "/v1/chat/completions", {}, None, 405),
        ("POST", "/v1/chat/completions", {}, b"{}", 401),
        ("POST", "/v1/chat/completions", json_auth, b"[", 400),
        ("POST", "/v1/chat/completions", auth, b"[", 415),  # aiohttp labels bytes octet-stream
        ("POST", "/v1/chat/completions", json_auth, io.BytesIO(big), 413),
        ("GET", "/admin/keys", {}, None, 401),
        ("GET", "/admin/keys", {"Authorization": f"Bearer {ADMIN_KEY}"}, None, 200),
        # an admin body over the limit (aiohttp's own check) is a 413 in the API's shape too
        ("POST", "/admin/sql", {"Authorization": f"Bearer {ADMIN_KEY}"}, io.BytesIO(big), 413),
    ]
    seen = set()
    for method, path, headers, body, status in cases:
        async with gw.http.request(method, gw.url + path, headers=headers, data=body) as r:
            assert r.status == status, (method, path, await r.text())
            rid = r.headers.get("X-Request-Id", "")
            assert REQUEST_ID.match(rid), (method, path, rid)
            seen.add(rid)
            if status >= 400:
                assert "error" in await r.json(), (method, path)
    assert len(seen) == len(cases)


# ---- OPTIONS and wrong methods --------------------------------------------------------


async def test_options_lists_the_methods_and_wrong_methods_are_405_with_allow(gw: Gw) -> None:
    for path, allow in (
        ("/admin/keys", {"GET", "HEAD", "POST", "OPTIONS"}),
        ("/admin/keys/k_123", {"GET", "HEAD", "PATCH", "DELETE", "OPTIONS"}),
        ("/v1/chat/completions", {"POST", "OPTIONS"}),
        ("/v1/messages", {"POST", "OPTIONS"}),
    ):
        async with gw.http.options(gw.url + path) as r:
            assert r.status == 204, (path, await r.text())
            assert set(r.headers["Allow"].split(", ")) == allow, path
            assert REQUEST_ID.match(r.headers["X-Request-Id"])
    async with gw.http.put(gw.url + "/admin/keys") as r:
        assert r.status == 405
        assert "POST" in r.headers["Allow"]
        assert (await r.json())["error"]["code"] == "method_not_allowed"
    async with gw.http.options(gw.url + "/admin/nothing-here") as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "not_found"


# ---- oversized headers and malformed requests -----------------------------------------


def test_oversized_header_is_a_431_in_the_provider_shape(served: tuple[int, Proc]) -> None:
    port, proc = served
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key=KEY,
        max_retries=0,
        default_headers={"X-Big": "secretish" * 1000},  # 9000 bytes: over aiohttp's 8190
    )
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="gpt-5.4-mini", messages=[{"role": "user", "content": "hi"}]
        )
    client.close()
    err = info.value
    assert err.status_code == 431
    assert isinstance(err.body, dict) and err.body["code"] == "request_headers_too_large"
    assert REQUEST_ID.match(err.response.headers["x-request-id"])
    # the same request with a small header works: the 431 is the size, nothing else
    ok = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    assert ok.chat.completions.create(
        model="gpt-5.4-mini", messages=[{"role": "user", "content": "hi"}]
    ).choices
    ok.close()

    with rawhttp.connect(port) as sock:  # too many headers
        many = {f"X-H{i}": "v" for i in range(200)}
        sock.sendall(rawhttp.head("GET", "/healthz", many))
        reply = rawhttp.read_reply(sock)
    assert reply.status == 431 and reply.json()["error"]["type"] == "invalid_request_error"

    with rawhttp.connect(port) as sock:  # not HTTP at all
        sock.sendall(b"\x16\x03\x01 hello\r\n\r\n")
        reply = rawhttp.read_reply(sock)
    assert reply.status == 400
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert REQUEST_ID.match(reply.headers["x-request-id"])
    assert "Traceback" not in proc.text() and "secretish" not in proc.text()


# ---- header and keep-alive timeouts ---------------------------------------------------
# header_timeout 0.5s, keepalive_timeout 3s: aiohttp's keep-alive timer also closes a
# connection that is waiting for headers, so every close asserted here must come before it.


def _closed_soon(sock: socket.socket, started: float) -> bool:
    return rawhttp.closed_within(sock, 2.0) and time.monotonic() - started < 2.2


def test_partial_headers_are_closed_after_the_header_timeout(served: tuple[int, Proc]) -> None:
    port, _ = served
    with rawhttp.connect(port) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
        assert not rawhttp.closed_within(sock, 0.3)  # not before the deadline ...
        assert _closed_soon(sock, started)  # ... but soon after it, long before keep-alive's

    # trickling a byte at a time does not restart the deadline
    with rawhttp.connect(port) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        closed = False
        while not closed and time.monotonic() - started < 4.0:
            try:
                sock.sendall(b"X")
                closed = rawhttp.closed_within(sock, 0.2)
            except OSError:
                closed = True
        assert closed and time.monotonic() - started < 2.2

    # a connection that never sends anything is closed as well
    with rawhttp.connect(port) as sock:
        assert _closed_soon(sock, time.monotonic())


def test_partial_headers_of_a_later_request_are_closed_after_the_header_timeout(
    served: tuple[int, Proc],
) -> None:
    """The deadline of a keep-alive connection's next request runs from its first bytes."""
    port, _ = served
    with rawhttp.connect(port) as sock:
        sock.sendall(rawhttp.head("GET", "/healthz", {}))
        assert rawhttp.read_reply(sock).status == 200
        sock.sendall(rawhttp.head("GET", "/healthz", {}))  # headers in one piece: no deadline
        assert rawhttp.read_reply(sock).status == 200
        # the server's connection loop takes up waiting for the next request one loop turn
        # after the reply went out; bytes in that turn are not timed (they are rare: a client
        # sends its next request after reading the reply, and the keep-alive timer applies)
        time.sleep(0.1)
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert not rawhttp.closed_within(sock, 0.3)
        assert _closed_soon(sock, started)


def test_idle_keep_alive_lasts_the_keepalive_timeout_not_the_header_one(
    served: tuple[int, Proc],
) -> None:
    port, _ = served
    with rawhttp.connect(port) as sock:
        sock.sendall(rawhttp.head("GET", "/healthz", {}))
        assert rawhttp.read_reply(sock).status == 200
        assert not rawhttp.closed_within(sock, 1.2)  # past the header timeout: still open
        sock.sendall(rawhttp.head("GET", "/healthz", {}))  # and reusable
        assert rawhttp.read_reply(sock).status == 200
        started = time.monotonic()
        assert rawhttp.closed_within(sock, 5.0)  # keepalive_timeout: 3s
        assert 2.0 < time.monotonic() - started < 5.0


# ---- shutdown -------------------------------------------------------------------------


def test_sigterm_finishes_within_the_shutdown_timeout(emulator_port: int, tmp_path: Path) -> None:
    policy, port = _policy(tmp_path, emulator_port, shutdown_timeout="1s")
    url = f"http://127.0.0.1:{port}/v1"
    gw = Proc([*TOLLWAY, "serve", "--policy", str(policy)])
    try:
        gw.wait_for("tollway listening")
        first_chunk = threading.Event()
        outcome: dict[str, Any] = {}

        def slow_stream() -> None:  # ~100 s of stream unless shutdown cuts it
            client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
            chunks = 0
            try:
                stream = client.chat.completions.create(
                    model="gpt-5.4-mini",
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                    extra_headers={"x-emulator-words": "1000", "x-emulator-chunk-delay-ms": "100"},
                )
                for _ in stream:
                    chunks += 1
                    first_chunk.set()
            except (openai.APIError, OSError) as e:
                outcome["error"] = e
            outcome["chunks"] = chunks
            client.close()

        def short_request() -> None:  # already running when SIGTERM comes: it still completes
            client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
            reply = client.chat.completions.create(
                model="gpt-5.4-mini",
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-emulator-latency-ms": "400"},
            )
            outcome["short"] = reply.choices[0].message.content
            client.close()

        streamer = threading.Thread(target=slow_stream, daemon=True)
        streamer.start()
        assert first_chunk.wait(10), "the stream did not start"
        short = threading.Thread(target=short_request, daemon=True)
        short.start()
        emulator = Http(emulator_port)

        def both_in_flight() -> bool:
            _, _, stats = emulator.request("GET", "/_emulator/stats")
            return int(orjson.loads(stats)["in_flight"]) >= 2

        wait_for(both_in_flight, 10.0, "the stream and the short request at the provider")
        emulator.close()
        started = time.monotonic()
        gw.popen.send_signal(signal.SIGTERM)
        code = gw.popen.wait(timeout=15)
        took = time.monotonic() - started
        streamer.join(5)
        short.join(5)
    finally:
        gw.stop()
    assert code == 0, gw.text()
    assert 0.8 < took < 3.5, f"SIGTERM took {took:.1f}s with shutdown_timeout 1s"
    assert outcome.get("short"), outcome  # in-flight work got its time
    assert 0 < outcome["chunks"] < 100, outcome  # the long stream was cut, not waited for
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
