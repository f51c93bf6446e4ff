"""Decompression bomb: a ~1 MB gzip body that inflates to 1 GB cannot hurt the gateway.

The key is checked before the body is read (an unauthenticated bomb is a 401 while it is still
being uploaded), the inflated size is bounded while inflating (413 as soon as it passes
``listen.max_body_bytes``), the gateway's peak memory stays small and it keeps answering
meanwhile. Encodings are accepted only where the policy lists them, and the provider gets the
body decoded, without the client's Content-Encoding.
"""

from __future__ import annotations

import http.client
import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Emulator
from tests.procs import TOLLWAY, running, wait_for
from tests.security import rawhttp
from tests.security.helpers import static_key_policy

KEY = "sk-bomb-test-key"
MAX_BODY = 10 * 1024 * 1024
INFLATED = 1 << 30


def gzip_bomb() -> bytes:
    """A valid gzip stream of 1 GB of zeros, ~1 MB long, built without 1 GB in memory.

    After a full flush deflate starts afresh, so every further MB of zeros compresses to the
    same bytes: one block is computed and repeated (compressing 1 GB would take seconds).
    """
    mb = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)  # raw deflate, gzip framing below
    block = c.compress(mb) + c.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(INFLATED // len(mb)):
        crc = zlib.crc32(mb, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", crc, INFLATED & 0xFFFFFFFF)
    return header + block * (INFLATED // len(mb)) + c.flush() + trailer


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = gzip_bomb()
    assert 900_000 < len(data) < 1_200_000  # ~1 MB on the wire ...
    d = zlib.decompressobj(31)
    assert len(d.decompress(data[:30_000], 2 * MAX_BODY)) == 2 * MAX_BODY  # inflating ~1000:1
    return data


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """A real `tollway serve` process: (port, pid)."""
    policy, port = static_key_policy(tmp_path_factory.mktemp("bomb"), KEY)
    with running([*TOLLWAY, "serve", "--policy", str(policy)], "tollway listening") as proc:
        yield port, proc.popen.pid


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


class HealthPoller(threading.Thread):
    """GET /healthz every 20 ms on one keep-alive connection; the latency of each answer."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.done.is_set():
            t = time.perf_counter()
            try:
                conn.request("GET", "/healthz")
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    self.failures.append(f"status {resp.status}")
            except (OSError, http.client.HTTPException) as e:
                self.failures.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                continue
            self.latencies.append(time.perf_counter() - t)
            time.sleep(0.02)
        conn.close()


def _bomb_head(body_len: int, **headers: str) -> bytes:
    return rawhttp.head(
        "POST",
        "/v1/chat/completions",
        {
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "Content-Length": str(body_len),
            **headers,
        },
    )


def test_bomb_is_refused_cheaply_and_the_gateway_keeps_answering(
    gateway: tuple[int, int], bomb: bytes
) -> None:
    port, pid = gateway
    rss_before = peak_rss_mb(pid)
    poller = HealthPoller(port)
    poller.start()
    wait_for(lambda: len(poller.latencies) >= 5, what="a few answers before the attack")
    try:
        # Unauthenticated: the 401 comes back while most of the body is still unsent, so
        # the key was checked before the body was read, let alone inflated.
        with rawhttp.connect(port) as sock:
            sock.sendall(_bomb_head(len(bomb)) + bomb[:65536])
            reply = rawhttp.read_reply(sock)
        assert reply.status == 401
        assert reply.json()["error"]["code"] == "missing_api_key"
        assert reply.headers["x-request-id"].startswith("req_")

        # Authenticated: inflating stops at max_body_bytes. The compressed body is under the
        # limit, so only the inflated size can give this 413 (the attack reached inflating).
        with rawhttp.connect(port, timeout=30) as sock:
            sock.sendall(_bomb_head(len(bomb), Authorization=f"Bearer {KEY}") + bomb)
            reply = rawhttp.read_reply(sock)
        assert reply.status == 413, reply
        error = reply.json()["error"]
        assert error["code"] == "request_too_large" and str(MAX_BODY) in error["message"]
        assert set(error) == {"message", "type", "param", "code"}
        after = len(poller.latencies) + 5
        wait_for(lambda: len(poller.latencies) >= after, what="answers after the attack too")
    finally:
        poller.done.set()
        poller.join(10)
    peak = peak_rss_mb(pid)
    assert peak < 300, f"peak RSS {peak:.0f} MB (before the attack: {rss_before:.0f} MB)"
    assert not poller.failures, poller.failures
    assert len(poller.latencies) >= 10, "too few /healthz answers to measure"
    worst = max(poller.latencies)
    assert worst < 0.1, f"/healthz took {worst * 1000:.0f} ms during the attack"


def _gzip(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


def _deflate(data: bytes, raw: bool = False) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


REQUEST = {
    "model": "gpt-5.4-mini",
    "messages": [{"role": "user", "content": "compressed hello " * 50}],
}


async def _post(
    url: str, key: str, body: bytes, encoding: str, path: str = "/v1/chat/completions"
) -> tuple[int, Any]:
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "Content-Encoding": encoding,
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}{path}", data=body, headers=headers) as r:
            return r.status, await r.json(content_type=None)


@pytest.mark.parametrize(
    "encoding, encode",
    [
        ("gzip", _gzip),
        ("deflate", _deflate),
        ("deflate", lambda b: _deflate(b, raw=True)),  # raw deflate, as some clients send it
    ],
)
async def test_compressed_body_within_limits_reaches_the_provider_decoded(
    make_gateway: Any, emulator: Emulator, encoding: str, encode: Any
) -> None:
    gw = await make_gateway()
    key = await gw.create_key()
    plain = json.dumps(REQUEST).encode()
    body = encode(plain)
    assert len(body) < len(plain) // 4  # really compressed
    status, reply = await _post(gw.url, key, body, encoding)
    assert status == 200, reply
    last = await emulator.last()
    assert "content-encoding" not in last["headers"]  # not labelled as the client sent it
    assert last["body"]["messages"] == REQUEST["messages"]  # and decoded


async def test_encodings_outside_the_policy_are_refused(
    make_gateway: Any, emulator: Emulator
) -> None:
    gw = await make_gateway("listen: {request_encodings: [gzip]}\nchain:\n  - name: auth\n")
    key = await gw.create_key()
    plain = json.dumps(REQUEST).encode()
    assert (await _post(gw.url, key, _gzip(plain), "gzip"))[0] == 200  # allowed: works
    before = (await emulator.stats())["requests"]
    for encoding, body in (("deflate", _deflate(plain)), ("br", b"\x0b\x02\x80{}\x03")):
        status, reply = await _post(gw.url, key, body, encoding)
        assert status == 415, reply
        assert reply["error"]["code"] == "unsupported_content_encoding"
    status, reply = await _post(gw.url, key, _deflate(plain), "deflate", "/v1/messages")
    assert status == 415 and reply["type"] == "error"  # Anthropic's shape on /v1/messages
    assert reply["error"]["type"] == "invalid_request_error"
    assert (await emulator.stats())["requests"] == before  # nothing reached the provider


async def test_corrupt_or_truncated_compressed_bodies_are_a_400(
    make_gateway: Any, emulator: Emulator
) -> None:
    gw = await make_gateway()
    key = await gw.create_key()
    good = _gzip(json.dumps(REQUEST).encode())
    for body in (b"not gzip at all", good[:-12], good + b"trailing"):
        status, reply = await _post(gw.url, key, body, "gzip")
        assert status == 400, (body[-10:], reply)
        assert reply["error"]["code"] == "invalid_content_encoding"
