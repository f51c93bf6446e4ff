"""The stored responses: sealed at rest, tenant-scoped, bounded, expiring, on memory and Redis."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from plugins.responses.backend import MemoryBackend
from plugins.responses.conversation import Unavailable, conversation, turn_items
from plugins.responses.store import NAMESPACE, ResponseStore, StoreUnavailable

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))
PROMPT = "my card is 4111 1111 1111 1111 and my secret plan is blue-falcon"


def record(rid: str = "resp_1", owner: str = "alice", **extra: Any) -> dict[str, Any]:
    return {
        "v": 1,
        "id": rid,
        "owner": owner,
        "created_at": 1700000000,
        "model": "claude-sonnet",
        "kind": "gateway",
        "provider": "anthropic",
        "prev": None,
        "items": [{"type": "message", "role": "user", "content": PROMPT}],
        "response": {"id": rid, "object": "response", "output": [{"type": "message"}]},
        **extra,
    }


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def memory_store(**kw: Any) -> ResponseStore:
    kw.setdefault("keys", [("a", KEY_A)])
    return ResponseStore(**kw)


# ---- memory -----------------------------------------------------------------------------------


async def test_round_trip_is_sealed_and_scoped_to_its_owner() -> None:
    s = memory_store()
    assert await s.put(record(), ttl=60)
    assert (await s.get("resp_1"))["items"][0]["content"] == PROMPT  # type: ignore[index]
    assert await s.get_owned("resp_1", "alice") is not None
    assert await s.get_owned("resp_1", "bob") is None  # another tenant: as if it never existed
    assert await s.get_owned("resp_404", "alice") is None
    backend = s.backend
    assert isinstance(backend, MemoryBackend)
    raw = b"".join(backend.raw())
    assert raw and b"blue-falcon" not in raw and b"4111" not in raw and b"alice" not in raw


async def test_a_live_record_is_never_replaced() -> None:
    """A reply replayed with an id already stored (a cache hit) cannot take the id over."""
    s = memory_store()
    assert await s.put(record(), ttl=60)
    assert not await s.put(record(owner="mallory"), ttl=60)
    assert (await s.get("resp_1"))["owner"] == "alice"  # type: ignore[index]
    assert s.stats.exists == 1
    assert await s.forget_owner("mallory") == 0
    assert await s.get("resp_1") is not None


async def test_ttl_expiry_with_an_injected_clock() -> None:
    clock = Clock()
    s = memory_store(clock=clock)
    await s.put(record(), ttl=30)
    clock.now += 29.9
    assert await s.get("resp_1") is not None
    clock.now += 0.2
    assert await s.get("resp_1") is None
    assert await s.put(record(owner="bob"), ttl=30)  # expired: the id may be stored again


async def test_tampered_copied_and_rotated_records() -> None:
    s = memory_store()
    await s.put(record(), ttl=60)
    backend = s.backend
    assert isinstance(backend, MemoryBackend)
    blob = backend._store[NAMESPACE + "resp_1"][0]
    # the same bytes under another id do not open: the id is authenticated
    backend._store[NAMESPACE + "resp_2"] = (blob, backend._store[NAMESPACE + "resp_1"][1])
    assert await s.get("resp_2") is None
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    backend._store[NAMESPACE + "resp_1"] = (bytes(flipped), backend._store[NAMESPACE + "resp_1"][1])
    assert await s.get("resp_1") is None
    assert s.stats.decrypt_failures == 2
    await s.backend.delete("resp_1", "alice")
    await s.put(record(), ttl=60)
    s.set_keys([("b", KEY_B), ("a", KEY_A)])  # rotation: old records still open
    assert await s.get("resp_1") is not None
    s.set_keys([("b", KEY_B)])  # the old key dropped: its records are gone
    assert await s.get("resp_1") is None


async def test_oversize_records_and_lru_bound() -> None:
    s = memory_store(max_bytes=4000, max_record_bytes=1500)
    big = record(items=[{"type": "message", "role": "user", "content": "x" * 2000}])
    assert not await s.put(big, ttl=60)
    assert s.stats.oversize == 1 and await s.get("resp_1") is None
    for i in range(20):
        await s.put(record(f"resp_{i}"), ttl=60)
    records, nbytes, evictions = s.backend.footprint()
    assert nbytes <= 4000 and evictions > 0 and records < 20
    assert await s.get("resp_19") is not None and await s.get("resp_0") is None
    # evicted records leave nothing behind in the owner index
    assert set(await s.backend.owned("alice")) == {f"resp_{i}" for i in range(20 - records, 20)}


async def test_forget_owner_and_records_of() -> None:
    s = memory_store()
    for i in range(3):
        await s.put(record(f"resp_a{i}"), ttl=60)
    await s.put(record("resp_b", owner="bob"), ttl=60)
    assert {r["id"] for r in await s.records_of("alice")} == {"resp_a0", "resp_a1", "resp_a2"}
    assert await s.forget_owner("alice") == 3
    assert await s.get("resp_a0") is None and await s.get("resp_b") is not None
    assert await s.forget_owner("alice") == 0


# ---- conversation -----------------------------------------------------------------------------


def turn(rid: str, text: str, prev: str | None = None, **extra: Any) -> dict[str, Any]:
    out = {"id": f"msg_{rid}", "type": "message", "status": "completed", "role": "assistant"}
    return record(
        rid,
        prev=prev,
        items=[{"type": "message", "role": "user", "content": text}],
        response={"id": rid, "output": [{**out, "content": [{"text": f"re {text}"}]}]},
        **extra,
    )


async def test_conversation_walks_native_links_oldest_first() -> None:
    kept = {
        "r1": turn("r1", "one", kind="native", provider="openai"),
        "r2": turn("r2", "two", prev="r1", kind="native", provider="openai"),
        "r3": turn("r3", "three", prev="r2", kind="native", provider="openai"),
    }

    async def fetch(rid: str) -> dict[str, Any] | None:
        return kept.get(rid)

    items = await conversation(kept["r3"], fetch, None)
    texts = [i["content"] if i["role"] == "user" else i["content"][0]["text"] for i in items]
    assert texts == ["one", "re one", "two", "re two", "three", "re three"]
    assert items[1]["id"] == "msg_r1"  # a translated route takes items as they are
    # another provider gets items without the ids it would look up as its own
    other = await conversation(kept["r3"], fetch, "openai-eu")
    assert all("id" not in i and "status" not in i for i in other)
    assert (await conversation(kept["r3"], fetch, "openai"))[1]["id"] == "msg_r1"
    del kept["r1"]
    with pytest.raises(Unavailable) as gone:
        await conversation(kept["r3"], fetch, None)
    assert gone.value.status == 404


def test_reasoning_items_stay_with_their_provider() -> None:
    rec = turn("r1", "one", kind="native", provider="openai")
    rec["response"]["output"].insert(0, {"type": "reasoning", "id": "rs_1", "summary": []})
    assert [i["type"] for i in turn_items(rec, "openai")] == ["message", "reasoning", "message"]
    assert [i["type"] for i in turn_items(rec, "other")] == ["message", "message"]


async def test_a_record_without_content_cannot_be_expanded() -> None:
    rec = turn("r1", "one", kind="native", provider="openai")
    rec["items"] = rec["response"] = None

    async def fetch(rid: str) -> dict[str, Any] | None:
        return None

    with pytest.raises(Unavailable) as info:
        await conversation(rec, fetch, None)
    assert info.value.status == 400


# ---- redis ------------------------------------------------------------------------------------


@pytest.fixture
async def rstore(redis_url: str) -> AsyncIterator[ResponseStore]:
    s = memory_store(url=redis_url)
    yield s
    await s.close()


async def test_redis_round_trip_sealed_owned_and_expiring(
    rstore: ResponseStore, redis_url: str
) -> None:
    assert await rstore.put(record(), ttl=60)
    assert await rstore.get_owned("resp_1", "alice") is not None
    assert await rstore.get_owned("resp_1", "bob") is None
    client = aioredis.from_url(redis_url)
    try:
        raw = b"".join([await client.get(k) for k in await client.keys(NAMESPACE + "resp_*")])
        assert raw and b"blue-falcon" not in raw and b"4111" not in raw
        assert 0 < await client.pttl(NAMESPACE + "resp_1") <= 60_000
        # a second put of the id neither replaces it nor enters the other tenant's index
        assert not await rstore.put(record(owner="mallory"), ttl=60)
        assert await client.smembers(NAMESPACE + "owner:mallory") == set()
        assert await rstore.forget_owner("mallory") == 0
        assert await rstore.get_owned("resp_1", "alice") is not None
        await rstore.put(record("resp_short"), ttl=0.05)
        assert await client.pttl(NAMESPACE + "resp_short") <= 50
    finally:
        await client.aclose()


async def test_redis_forget_owner(rstore: ResponseStore) -> None:
    for i in range(3):
        await rstore.put(record(f"resp_a{i}"), ttl=60)
    await rstore.put(record("resp_b", owner="bob"), ttl=60)
    assert len(await rstore.records_of("alice")) == 3
    assert await rstore.forget_owner("alice") == 3
    assert await rstore.get("resp_a1") is None and await rstore.get("resp_b") is not None


async def test_unreachable_redis_reads_fail_and_writes_fail_open() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = memory_store(url=f"redis://127.0.0.1:{port}/0?timeout=0.2")
    try:
        assert not await s.put(record(), ttl=60)  # counted, never raised
        with pytest.raises(StoreUnavailable):
            await s.get("resp_1")
        assert s.stats.errors == 2
    finally:
        await s.close()


async def test_ids_that_are_not_response_ids_name_nothing(
    rstore: ResponseStore, redis_url: str
) -> None:
    """An id never addresses the store's own keys: ``owner:alice`` is the owner index."""
    assert await rstore.put(record(), ttl=60)
    assert await rstore.get("owner:alice") is None  # not a WRONGTYPE error, not the index
    assert await rstore.get("") is None and await rstore.get("a b") is None
    assert not await rstore.put(record("owner:bob"), ttl=60)
    assert await rstore.get_owned("resp_1", "alice") is not None
