"""A real headless Chromium driven over the DevTools protocol, for pages a user types into.

``--dump-dom`` (tests/proxy/test_dashboard.py) renders a page from its URL alone; a form that
must be filled in, then submitted, needs a driver. This one speaks the DevTools protocol over
aiohttp's WebSocket client (no extra package): navigate, type as a keyboard would
(``Input.insertText``), evaluate JavaScript and read the result, size the window, pin the time
zone and take a screenshot (``png_pixels`` reads it back with the standard library alone).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import shutil
import struct
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


HEADLESS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
"""A quiet headless Chromium: no GPU, no network of its own, nothing but the page."""


def need_chromium() -> str:
    """The browser's path; skips the test without one (fails it when ``CI=true``)."""
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no chromium (apt-get install chromium)")
        pytest.skip("no chromium")
    return CHROMIUM


class Page:
    """One tab: commands are sent and their answers awaited by id; events are ignored."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self._ids)
        await self.ws.send_json({"id": n, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), 30)
            if msg.get("id") == n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})  # type: ignore[no-any-return]

    async def eval(self, expression: str) -> Any:
        """The value of ``expression`` in the page (awaited if it is a promise)."""
        r = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def until(self, expression: str, within: float = 20.0) -> Any:
        """Poll ``expression`` until it is truthy; its value."""
        deadline = time.monotonic() + within
        while True:
            value = await self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"never true in the page: {expression}")
            await asyncio.sleep(0.05)

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.until("document.readyState === 'complete' && location.href !== 'about:blank'")

    async def type_into(self, element_id: str, text: str) -> None:
        """Focus the element and type ``text`` into it as keyboard input."""
        await self.eval(f"document.getElementById({element_id!r}).focus()")
        await self.send("Input.insertText", text=text)

    async def viewport(self, width: int, height: int, timezone: str | None = None) -> None:
        """Lay the page out in a ``width`` x ``height`` window (1 device pixel per CSS pixel,
        so a screenshot's pixels are the page's coordinates); ``timezone`` (an IANA name)
        makes local times in the page independent of the machine's."""
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        if timezone is not None:
            await self.send("Emulation.setTimezoneOverride", timezoneId=timezone)

    async def box(self, selector: str) -> dict[str, float]:
        """The bounding box (x, y, width, height in CSS pixels) of the first match, once it
        is laid out with a size (waited for)."""
        return await self.until(  # type: ignore[no-any-return]
            f"(() => {{ const e = document.querySelector({selector!r}); if (!e) return null;"
            " const r = e.getBoundingClientRect(); return r.width && r.height ?"
            " {x: r.x, y: r.y, width: r.width, height: r.height} : null; })()"
        )

    async def screenshot(self) -> bytes:
        """The viewport as PNG bytes."""
        r = await self.send("Page.captureScreenshot", format="png")
        return base64.b64decode(r["data"])


def png_pixels(png: bytes) -> tuple[int, int, list[list[tuple[int, ...]]]]:
    """Width, height and the rows of pixels of an 8-bit RGB(A) PNG (what Chromium writes),
    decoded with zlib alone: enough to check a screenshot drew something, not a general
    decoder (no palette, no interlace)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = data
        elif kind == b"IDAT":
            idat += data
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and not interlace, "not an 8-bit RGB(A) PNG"
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows: list[list[tuple[int, ...]]] = []
    prev = bytearray(stride)
    for r in range(height):
        kind, line = (
            raw[r * (stride + 1)],
            bytearray(raw[r * (stride + 1) + 1 : (r + 1) * (stride + 1)]),
        )
        for i in range(stride):  # undo the row's filter (PNG spec, section 9)
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append([tuple(line[i : i + 3]) for i in range(0, stride, bpp)])
        prev = line
    return width, height, rows


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[Page]:
    """A headless Chromium with one tab, closed on exit."""
    binary = need_chromium()
    profile.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        binary,
        *HEADLESS,
        "--remote-debugging-port=0",  # the port it took is written to DevToolsActivePort
        f"--user-data-dir={profile}",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or proc.returncode is not None:
                raise AssertionError("chromium did not open its DevTools port")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets = await r.json()
            target = next(t for t in targets if t.get("type") == "page")
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                await page.send("Page.enable")
                await page.send("Runtime.enable")
                yield page
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
