"""The response cache store: encryption at rest, key rotation, byte-bounded LRU, redis."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator

import pytest

from plugins.cache.memory import MemoryBackend
from plugins.cache.store import (
    NONCE_LEN,
    TAG_LEN,
    CacheStore,
    parse_key,
)
from tests.procs import fresh_interpreter

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))
SECRET = b"the model said: your SSN is 078-05-1120 " * 4


def store(**kwargs: object) -> CacheStore:
    kwargs.setdefault("keys", [("a", KEY_A)])
    return CacheStore(**kwargs)  # type: ignore[arg-type]


def entry_size(namespace: str, key: str, key_id: str, value_len: int) -> int:
    """What the memory backend charges for one entry: storage key + encrypted blob."""
    return len(namespace + key) + 2 + len(key_id) + NONCE_LEN + value_len + TAG_LEN


async def tamper(s: CacheStore, key: str, pos: int) -> None:
    raw = s.backend
    blob = bytearray(await raw.get(key))
    blob[pos] ^= 0x01
    await raw.set(key, bytes(blob), ttl=60.0)


# ---- memory backend: encryption -------------------------------------------------------------


async def test_round_trip_and_counters() -> None:
    s = store()
    assert await s.get("k") is None
    await s.set("k", SECRET, 60)
    assert await s.get("k") == SECRET
    await s.set("k", b"", 60.5)  # empty values are legitimate cached bodies
    assert await s.get("k") == b""
    await s.delete("k")
    assert await s.get("k") is None
    st = s.stats
    assert (st.hits, st.misses, st.sets, st.entries, st.bytes) == (2, 2, 2, 0, 0)
    assert (st.decrypt_failures, st.errors, st.evictions) == (0, 0, 0)
    await s.close()


async def test_ttl_expiry_and_non_positive_ttl() -> None:
    s = store()
    await s.set("short", b"v", 0.2)
    await s.set("long", b"w", 60)
    assert await s.get("short") == b"v"
    await asyncio.sleep(0.25)
    assert await s.get("short") is None
    assert await s.get("long") == b"w"
    assert s.stats.entries == 1
    await s.set("long", b"x", 0)  # an already-stale entry: drop the old value too
    assert await s.get("long") is None
    assert s.stats.entries == 0
    await s.close()


async def test_stored_bytes_hold_no_plaintext_or_key_material() -> None:
    s = store(keys=[("key-2024", KEY_A)])
    await s.set("conv:1", SECRET, 60)
    raw = await s.backend.get("conv:1")
    assert isinstance(raw, bytes)
    assert raw[0] == 1 and raw[2 : 2 + raw[1]] == b"key-2024"
    for needle in (SECRET, b"078-05-1120", b"the model", KEY_A, KEY_A.hex().encode()):
        assert needle not in raw
    assert base64.b64encode(KEY_A) not in raw
    assert len(raw) == 2 + 8 + NONCE_LEN + len(SECRET) + TAG_LEN
    # a fresh random nonce per write: the same plaintext never gives the same bytes
    await s.set("conv:1", SECRET, 60)
    assert await s.backend.get("conv:1") != raw
    await s.close()


@pytest.mark.parametrize(
    "pos", [0, 1, 2, 4, 20, -1], ids=["ver", "kidlen", "kid", "nonce", "ct", "tag"]
)
async def test_tampered_entry_is_a_counted_miss(pos: int) -> None:
    s = store()
    await s.set("k", SECRET, 60)
    await tamper(s, "k", pos)
    assert await s.get("k") is None
    assert (s.stats.decrypt_failures, s.stats.misses, s.stats.hits, s.stats.errors) == (1, 1, 0, 0)
    await s.close()


async def test_garbage_and_truncated_entries_are_misses() -> None:
    s = store()
    raw = s.backend
    for junk in (b"", b"\x01", b"\x01\x01a", b"\x01\x01a" + b"\0" * 27, "text", SECRET):
        await raw.set("k", junk, ttl=60.0)
        assert await s.get("k") is None
    assert s.stats.decrypt_failures == 6
    await s.close()


async def test_entry_copied_under_another_key_does_not_decrypt() -> None:
    s = store()
    await s.set("alice", SECRET, 60)
    blob = await s.backend.get("alice")
    await s.backend.set("mallory", blob, ttl=60.0)
    assert await s.get("mallory") is None
    assert s.stats.decrypt_failures == 1
    assert await s.get("alice") == SECRET
    # the namespace is bound too: the same key in another namespace is another entry
    other = store(namespace="other:")
    await other.backend.set("alice", blob, ttl=60.0)
    assert await other.get("alice") is None
    assert other.stats.decrypt_failures == 1
    await s.close()
    await other.close()


async def test_key_rotation() -> None:
    old = store(keys=[("A", KEY_A)])
    await old.set("k1", b"written with A", 60)
    blob = await old.backend.get("k1")

    rotated = store(keys=[("B", KEY_B), ("A", KEY_A)])
    await rotated.backend.set("k1", blob, ttl=60.0)
    assert await rotated.get("k1") == b"written with A"
    await rotated.set("k2", b"written with B", 60)
    new_blob = await rotated.backend.get("k2")
    assert new_blob[2 : 2 + new_blob[1]] == b"B"

    only_b = store(keys=[("B", KEY_B)])
    for k, v in (("k1", blob), ("k2", new_blob)):
        await only_b.backend.set(k, v, ttl=60.0)
    assert await only_b.get("k1") is None  # key id A is gone
    assert await only_b.get("k2") == b"written with B"
    assert only_b.stats.decrypt_failures == 1

    # same key id, different key material (a botched rotation) also fails closed
    impostor = store(keys=[("A", KEY_B)])
    await impostor.backend.set("k1", blob, ttl=60.0)
    assert await impostor.get("k1") is None
    assert impostor.stats.decrypt_failures == 1
    for s in (old, rotated, only_b, impostor):
        await s.close()


# ---- memory backend: byte bound -------------------------------------------------------------


async def test_lru_eviction_by_bytes() -> None:
    size = entry_size("ns:", "k0", "a", 100)
    s = store(namespace="ns:", max_bytes=3 * size + size // 2)
    for k in ("k0", "k1", "k2"):
        await s.set(k, os.urandom(100), 60)
    assert (s.stats.entries, s.stats.bytes, s.stats.evictions) == (3, 3 * size, 0)
    assert await s.get("k0") is not None  # k0 becomes most recently used; k1 is now LRU
    await s.set("k3", os.urandom(100), 60)
    assert (s.stats.entries, s.stats.bytes, s.stats.evictions) == (3, 3 * size, 1)
    assert await s.get("k1") is None
    assert all([await s.get(k) is not None for k in ("k0", "k2", "k3")])
    # overwriting in place re-charges the entry, it does not evict
    await s.set("k2", os.urandom(100), 60)
    assert (s.stats.entries, s.stats.bytes, s.stats.evictions) == (3, 3 * size, 1)
    # a bigger entry pushes out as many LRU entries as it needs: k0 and k3 (k2 was just set)
    await s.set("k4", os.urandom(100 + size), 60)
    assert (s.stats.entries, s.stats.evictions) == (2, 3)
    assert s.stats.bytes == size + entry_size("ns:", "k4", "a", 100 + size)
    assert await s.get("k2") is not None and await s.get("k4") is not None
    await s.close()


async def test_expired_entries_are_dropped_not_counted_as_evictions() -> None:
    size = entry_size("tollway:cache:", "k0", "a", 50)
    s = store(max_bytes=2 * size)
    await s.set("k0", b"x" * 50, 0.05)
    await s.set("k1", b"y" * 50, 60)
    await asyncio.sleep(0.1)
    await s.set("k2", b"z" * 50, 60)  # needs room: the LRU entry k0 has expired
    assert (s.stats.entries, s.stats.bytes, s.stats.evictions) == (2, 2 * size, 0)
    await s.close()


async def test_oversize_entry_is_not_stored() -> None:
    s = store(max_bytes=1000)
    await s.set("small", b"s" * 100, 60)
    await s.set("big", b"b" * 1000, 60)  # fits alone in plaintext, not with the overhead
    assert await s.get("big") is None
    assert await s.get("small") == b"s" * 100  # nothing was evicted to make room for it
    await s.set("small", b"s" * 5000, 60)  # an oversize overwrite drops the stale value
    assert await s.get("small") is None
    st = s.stats
    assert (st.sets, st.oversize, st.entries, st.bytes, st.evictions) == (1, 2, 0, 0, 0)
    await s.close()


async def test_memory_backend_interface() -> None:
    """The in-process ``CacheBackend`` on its own: namespaced keys, TTL, delete counts, the
    flight lock that no other instance can hold, and close."""
    c = MemoryBackend(10_000, namespace="n:")
    assert await c.set("a", b"1", ttl=60)
    assert await c.set("b", b"2") and await c.set("c", b"3", ttl=0.01)
    assert [await c.get(k) for k in ("a", "b", "z")] == [b"1", b"2", None]
    assert set(c._store) == {"n:a", "n:b", "n:c"}
    assert c.footprint() == (3, 3 * 4, 0)
    await asyncio.sleep(0.03)
    assert await c.get("c") is None and len(c) == 2  # expired: dropped when looked at
    assert await c.delete("b") == 1 and await c.delete("b") == 0
    assert not c.distributed and await c.claim("z", b"me", 1.0) == (None, None)
    assert await c.claim("a", b"me", 1.0) == (b"1", None)  # the entry, no lock
    assert not await c.in_flight("a")
    await c.close()
    assert len(c) == 0 and c.nbytes == 0


# ---- configuration ---------------------------------------------------------------------------


def test_parse_key_accepts_hex_and_base64() -> None:
    assert parse_key(KEY_A.hex()) == KEY_A
    assert parse_key(KEY_A.hex().upper()) == KEY_A
    assert parse_key(f"  {KEY_A.hex()}\n") == KEY_A
    key = b"\xfb\xff" * 16  # exercises the +/ vs -_ alphabets
    assert parse_key(base64.b64encode(key).decode()) == key
    assert parse_key(base64.urlsafe_b64encode(key).decode()) == key
    assert parse_key(base64.b64encode(key).decode().rstrip("=")) == key


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "zz" * 32,  # 64 chars, not hex
        KEY_A.hex()[:-2],  # 31 bytes of hex
        base64.b64encode(KEY_A[:31]).decode(),
        base64.b64encode(KEY_A + b"x").decode(),
        "not a key at all!!",
        "correct horse battery staple",
    ],
)
def test_parse_key_rejects_bad_input_without_echoing_it(bad: str) -> None:
    with pytest.raises(ValueError, match=r"32 bytes|not valid hex") as info:
        parse_key(bad)
    if bad:
        assert bad not in str(info.value)


def test_constructor_validates_keys_and_url() -> None:
    with pytest.raises(ValueError, match="at least one"):
        CacheStore(keys=[])
    with pytest.raises(ValueError, match="32 bytes"):
        CacheStore(keys=[("a", b"short")])
    with pytest.raises(ValueError, match="duplicate"):
        CacheStore(keys=[("a", KEY_A), ("a", KEY_B)])
    with pytest.raises(ValueError, match="key ids"):
        CacheStore(keys=[("", KEY_A)])
    with pytest.raises(ValueError, match="scheme"):
        CacheStore(url="memcached://x", keys=[("a", KEY_A)])


async def test_backend_errors_are_counted_misses(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = store()

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"backend exploded on {args!r}")

    async def aboom(*args: object, **kwargs: object) -> None:
        boom(*args)

    monkeypatch.setattr(s.backend, "get", aboom)
    monkeypatch.setattr(s.backend, "set", aboom)
    monkeypatch.setattr(s.backend, "delete", aboom)
    with caplog.at_level(logging.WARNING, logger="plugins.cache.store"):
        await s.set("user:42", SECRET, 60)
        assert await s.get("user:42") is None
        await s.delete("user:42")
    assert (s.stats.errors, s.stats.misses, s.stats.sets) == (3, 1, 0)
    assert len(caplog.records) == 1  # one line per interval, the others are counted
    assert "user:42" not in caplog.text and "SSN" not in caplog.text
    await s.close()


async def test_unreachable_redis_fails_open() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes
    s = store(url=f"redis://127.0.0.1:{port}/0?timeout=0.2")
    await s.set("k", b"v", 60)
    assert await s.get("k") is None
    assert (s.stats.errors, s.stats.misses) == (2, 1)
    await s.close()


# ---- redis backend ---------------------------------------------------------------------------


@pytest.fixture
async def rstore(redis_url: str) -> AsyncIterator[CacheStore]:
    ns = f"tollway:test:{uuid.uuid4().hex}:"
    s = store(url=redis_url, namespace=ns, keys=[("r1", KEY_A)])
    yield s
    client = s.backend.client
    keys = [k async for k in client.scan_iter(match=f"{ns}*")]
    if keys:
        await client.delete(*keys)
    await s.close()


async def test_redis_round_trip_ttl_and_ciphertext(rstore: CacheStore) -> None:
    client = rstore.backend.client
    ns = rstore.backend.namespace
    await rstore.set("k", SECRET, 60)
    assert await rstore.get("k") == SECRET
    raw = await client.get(f"{ns}k")  # stored under namespace + key, no extra ':'
    assert isinstance(raw, bytes) and SECRET not in raw and KEY_A not in raw
    assert 0 < await client.pttl(f"{ns}k") <= 60_000  # TTL lives on the server
    await rstore.set("short", b"v", 0.2)
    assert await rstore.get("short") == b"v"
    await asyncio.sleep(0.25)
    assert await rstore.get("short") is None
    await rstore.delete("k")
    assert await rstore.get("k") is None
    st = rstore.stats
    assert (st.hits, st.misses, st.sets, st.errors, st.entries) == (2, 2, 2, 0, 0)


async def test_redis_tamper_copy_and_rotation(rstore: CacheStore, redis_url: str) -> None:
    client = rstore.backend.client
    ns = rstore.backend.namespace
    await rstore.set("alice", SECRET, 60)
    blob = await client.get(f"{ns}alice")
    await client.set(f"{ns}mallory", blob)
    assert await rstore.get("mallory") is None
    await client.set(f"{ns}alice", blob[:-1] + bytes([blob[-1] ^ 1]))
    assert await rstore.get("alice") is None
    assert rstore.stats.decrypt_failures == 2

    await client.set(f"{ns}alice", blob)
    rotated = store(url=redis_url, namespace=ns, keys=[("r2", KEY_B), ("r1", KEY_A)])
    only_new = store(url=redis_url, namespace=ns, keys=[("r2", KEY_B)])
    try:
        assert await rotated.get("alice") == SECRET
        await rotated.set("bob", b"new", 60)
        assert (await client.get(f"{ns}bob"))[2:4] == b"r2"
        assert await only_new.get("bob") == b"new"
        assert await only_new.get("alice") is None
        assert only_new.stats.decrypt_failures == 1
    finally:
        await rotated.close()
        await only_new.close()


def test_redis_client_is_loaded_only_for_a_redis_backend() -> None:
    """A gateway on memory:// does not carry redis-py (7 MB); a Redis policy still gets it."""
    script = (
        "import sys\n"
        "import plugins.cache.store as cs\n"
        "m = cs.CacheStore(keys=[('a', bytes(32))])\n"
        "assert 'redis' not in sys.modules, 'redis-py loaded by the memory backend'\n"
        "assert 'aiocache' not in sys.modules\n"
        "s = cs.CacheStore(url='redis://127.0.0.1:1/0', keys=[('a', bytes(32))])\n"
        "assert 'redis' in sys.modules\n"
        "from aiocache.backends.redis import RedisCache\n"
        "assert isinstance(s.backend.cache, RedisCache)\n"
        "print('ok')\n"
    )
    assert fresh_interpreter(script) == "ok"


async def test_forget_owner_memory_and_eviction() -> None:
    s = store(max_bytes=4000)
    for i in range(3):
        await s.set(f"ann{i}", b"a" * 100, 60, owner="ann")
    await s.set("bob0", b"b" * 100, 60, owner="bob")
    await s.set("shared", b"s" * 100, 60)
    assert await s.forget_owner("ann") == 3
    assert [await s.get(f"ann{i}") for i in range(3)] == [None] * 3
    assert await s.get("bob0") == b"b" * 100 and await s.get("shared") == b"s" * 100
    assert await s.forget_owner("ann") == 0
    # evicted and overwritten entries leave nothing behind in the owner index
    for i in range(40):
        await s.set(f"bob{i % 30}", b"b" * 100, 60, owner="bob")
    memory = s.backend
    assert memory.evictions > 0
    live = {k for k in memory._store if k.split(":")[-1].startswith("bob")}
    assert memory._owned == {"bob": live} and set(memory._owner_of) == live
    assert await s.forget_owner("bob") == len(live)
    assert not memory._owned and not memory._owner_of
    assert not any(k.split(":")[-1].startswith("bob") for k in memory._store)


async def test_redis_forget_owner(rstore: CacheStore) -> None:
    client = rstore.backend.client
    ns = rstore.backend.namespace
    await rstore.set("a1", b"x", 60, owner="ann")
    await rstore.set("a2", b"y", 120, owner="ann")
    await rstore.set("b1", b"z", 60, owner="bob")
    assert 60_000 < await client.pttl(f"{ns}owner:ann") <= 120_000  # lives as its longest entry
    assert await rstore.forget_owner("ann") == 2
    assert await rstore.get("a1") is None and await rstore.get("a2") is None
    assert await rstore.get("b1") == b"z"
    assert not await client.exists(f"{ns}owner:ann")
    assert await rstore.forget_owner("ann") == 0
