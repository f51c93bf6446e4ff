"""Reading a request body with a bound on what it costs, compressed or not.

aiohttp would inflate a ``Content-Encoding: gzip`` body by itself, and the length it checks
is the compressed one: a 1 MB upload can inflate to gigabytes. The gateway's server therefore
runs with aiohttp's decompression off (``create_app`` sets ``auto_decompress=False``) and the
body is inflated here, ``max_length`` at a time, so no more than about ``max_body`` bytes are
ever held and the request is refused (413) as soon as the inflated size passes it. Only the
encodings the policy lists are accepted (415 otherwise); the provider always gets the parsed
body re-encoded plain, never the client's encoding.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Collection

from aiohttp import web

from proxy.errors import Reject

_READ = 65536
_STEP = 1 << 18  # inflate at most this much per call, then let the loop run (~3 ms of zeros)
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def too_large(max_body: int) -> Reject:
    return Reject(413, f"request body exceeds {max_body} bytes", code="request_too_large")


def _encoding(request: web.Request, allowed: Collection[str]) -> str | None:
    """The body's one content coding (None: plain), or a 415 if it is not allowed."""
    value = request.headers.get("content-encoding")
    if value is None:
        return None
    coding = value.strip().lower()
    if coding in ("", "identity"):
        return None
    if coding not in allowed:
        accepted = ", ".join(allowed) or "none"
        raise Reject(
            415,
            f"Content-Encoding {value[:40]!r} is not accepted here (accepted: {accepted})",
            code="unsupported_content_encoding",
        )
    return coding


async def read_body(request: web.Request, max_body: int, encodings: Collection[str]) -> bytes:
    """The request body, decoded, or a Reject: 413 past ``max_body`` bytes (counted after
    inflating), 415 for an encoding the policy does not accept, 400 for a corrupt one."""
    coding = _encoding(request, encodings)
    length = request.content_length
    if length is not None and length > max_body:
        raise too_large(max_body)
    if coding is not None:
        return await _inflate(request, max_body, coding)
    if length is None:
        return await _read_chunked(request, max_body)
    # Within the limit (checked). The usual body came with its headers and is buffered
    # already: one read of ``length`` bytes takes it, without ``read()``'s second wait for the
    # end of the stream; the rest, if any, is read to the end. Inline, not in a helper: a
    # coroutine per call is a measurable part of the gateway's own cost per request.
    content = request.content
    data = await content.read(length)
    if len(data) < length:
        data += await content.read()
    return data


async def _read_chunked(request: web.Request, max_body: int) -> bytes:
    content = request.content
    buf = bytearray()  # chunked upload: stop reading as soon as it is too large
    while chunk := await content.read(_READ):
        buf += chunk
        if len(buf) > max_body:
            raise too_large(max_body)
    return bytes(buf)


async def _inflate(request: web.Request, max_body: int, coding: str) -> bytes:
    """Inflate as the compressed bytes arrive, never producing more than ``max_body + 1``."""
    d: zlib._Decompress | None = None
    out = bytearray()
    raw = 0
    while chunk := await request.content.read(_READ):
        raw += len(chunk)
        if raw > max_body:  # compressed larger than allowed: no need to inflate it
            raise too_large(max_body)
        if d is None:
            d = _decompressor(coding, chunk)
        data = chunk
        try:
            while data:
                out += d.decompress(data, min(_STEP, max_body + 1 - len(out)))
                if len(out) > max_body:
                    raise too_large(max_body)
                data = d.unconsumed_tail
                if data:  # 64 KB can inflate to 64 MB: other requests run in between
                    await asyncio.sleep(0)
        except zlib.error:
            raise _corrupt(coding) from None
    if d is None:
        return b""
    if not d.eof or d.unused_data:  # truncated, or bytes after the end of the stream
        raise _corrupt(coding)
    return bytes(out)


def _decompressor(coding: str, first: bytes) -> zlib._Decompress:
    # "deflate" is meant to be zlib-wrapped (RFC 9110 8.4.1.2), but some clients send raw
    # deflate: a zlib stream starts with compression method 8 in its first byte's low bits.
    if coding == "deflate" and first[0] & 0x0F != 8:
        return zlib.decompressobj(-zlib.MAX_WBITS)
    return zlib.decompressobj(_WBITS[coding])


def _corrupt(coding: str) -> Reject:
    return Reject(
        400,
        f"request body is not valid {coding} data (Content-Encoding: {coding})",
        code="invalid_content_encoding",
    )
