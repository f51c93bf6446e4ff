"""client_ip_hash in usage rows is keyed (HMAC-SHA256): an unsalted hash of an address is
reversed by hashing all addresses; the keyed one is stable across restarts and useless without
the key."""

from __future__ import annotations

import hashlib
import hmac
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.chain import PluginStartError
from proxy.policy import PolicyError, load_text
from tests.conftest import ADMIN_KEY, BASE_POLICY, Emulator, start_site

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
IP = "127.0.0.1"  # the test client's address, as the gateway sees it


def policy(emulator_url: str, db: Path, key: str | None = None) -> str:
    extra = f", ip_hash_key: {key}" if key else ""
    return BASE_POLICY.format(admin=ADMIN_KEY, emu=emulator_url) + (
        "chain:\n  - name: auth\n"
        f"  - name: metering\n    config: {{database: {db}, flush_interval: 50ms{extra}}}\n"
    )


class Gateways:
    """Gateways started and stopped one after the other on the same files (a restart)."""

    def __init__(self, emulator: Emulator, tmp: Path, http: aiohttp.ClientSession) -> None:
        self.emulator, self.tmp, self.http = emulator, tmp, http
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, db: Path, key: str | None = None) -> None:
        await self.stop()
        app = create_app(load_text(policy(self.emulator.url, db, key), base=self.tmp))
        self.runner, self.url = await start_site(app)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def request_and_hash(self) -> str:
        """One chat request through the OpenAI SDK; the client_ip_hash of its usage row."""
        async with self.http.post(
            f"{self.url}/admin/keys", json={"user": "ip", "tier": "pro"}, headers=ADMIN
        ) as r:
            key = (await r.json())["key"]
        async with openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=key, max_retries=0
        ) as client:
            reply = await client.chat.completions.with_raw_response.create(
                model="gpt-5.4-mini", messages=[{"role": "user", "content": "hi"}]
            )
        request_id = reply.headers["x-request-id"]
        query = f"SELECT client_ip_hash FROM usage WHERE request_id = '{request_id}'"
        async with self.http.post(
            f"{self.url}/admin/sql", json={"query": query}, headers=ADMIN
        ) as r:
            rows = (await r.json())["rows"]
        assert len(rows) == 1
        return str(rows[0][0])


@pytest.fixture
async def gateways(emulator: Emulator, tmp_path: Path) -> AsyncIterator[Gateways]:
    async with aiohttp.ClientSession() as http:
        gws = Gateways(emulator, tmp_path, http)
        yield gws
        await gws.stop()


def hmac16(key: bytes, ip: str) -> str:
    return hmac.new(key, ip.encode(), hashlib.sha256).hexdigest()[:16]


async def test_default_key_is_random_private_and_survives_a_restart(
    gateways: Gateways, tmp_path: Path
) -> None:
    db = tmp_path / "data" / "usage.duckdb"
    await gateways.start(db)
    first = await gateways.request_and_hash()
    assert len(first) == 16
    assert first != hashlib.sha256(IP.encode()).hexdigest()[:16]  # not the unsalted hash

    key_file = db.with_suffix(".ip_hash_key")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = bytes.fromhex(key_file.read_text())
    assert len(key) == 32
    assert first == hmac16(key, IP)  # keyed by that file: whoever lacks it cannot reverse it

    await gateways.start(db)  # a restart on the same data folder: the same hash
    assert await gateways.request_and_hash() == first

    other = tmp_path / "elsewhere" / "usage.duckdb"  # another installation: another key
    await gateways.start(other)
    assert await gateways.request_and_hash() != first


async def test_configured_key(gateways: Gateways, tmp_path: Path) -> None:
    db = tmp_path / "usage.duckdb"
    await gateways.start(db, key="a-secret-of-the-operator")
    assert await gateways.request_and_hash() == hmac16(b"a-secret-of-the-operator", IP)
    assert not db.with_suffix(".ip_hash_key").exists()  # nothing generated when configured


async def test_a_damaged_key_file_stops_the_start(emulator: Emulator, tmp_path: Path) -> None:
    """A damaged key file is never silently replaced (every later hash would change)."""
    db = tmp_path / "usage.duckdb"
    db.with_suffix(".ip_hash_key").write_text("not hex\n")
    app = create_app(load_text(policy(emulator.url, db), base=tmp_path))
    runner = web.AppRunner(app)
    try:
        with pytest.raises(PluginStartError, match=r"metering could not start: .*ip_hash_key"):
            await runner.setup()
    finally:
        await app.cleanup()  # what started before metering (the upstream session) is closed


def test_short_configured_key_is_refused(tmp_path: Path) -> None:
    text = policy("http://127.0.0.1:1", tmp_path / "u.duckdb", key="short")
    with pytest.raises(PolicyError, match="ip_hash_key"):
        create_app(load_text(text, base=tmp_path))
