"""cache: hits, tenant isolation, TTL per feature, Cache-Control, stream/whole equivalence,
encryption at rest, tampering and key rotation, through a running gateway."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from plugins.cache.plugin import STORE
from proxy.appkeys import RESOURCES
from tests.conftest import ADMIN_KEY, BASE_POLICY, Emulator, Gw

KEY_A = "a" * 64
KEY_B = "b" * 64
PLANS = """
features:
  basic_suggestions: {{price_per_request: 0.01}}
  code_suggestions: {{price_per_request: 0.02}}
  quick: {{price_per_request: 0.01}}
  private: {{price_per_request: 0.01}}
tiers:
  pro: {{requests_per_month: 25000}}
"""
BASE = BASE_POLICY.split("features:")[0] + PLANS
SECRET_PROMPT = "the launch code is swordfish"


def chain(scope: str = "user", key: str = KEY_A, old: str = "", extra: str = "") -> str:
    old_keys = f", old_keys: [{old}]" if old else ""
    return (
        "chain:\n  - name: auth\n  - name: cache\n"
        f"    config: {{scope: {scope}, key: '{key}'{old_keys}, default_ttl: 1h,"
        f" ttl: {{quick: 300ms, code_suggestions: 1h}}, never: [private]{extra}}}\n"
    )


def ask(text: str = SECRET_PROMPT) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def calls(emulator: Emulator) -> int:
    return int((await emulator.stats())["requests"])


@pytest.fixture
async def cached(make_gateway: Any, emulator: Emulator) -> tuple[Gw, str]:
    gw = await make_gateway(chain(), base=BASE)
    await emulator.reset()
    return gw, await gw.create_key("cara", "pro")


async def test_repeat_is_a_hit(cached: tuple[Gw, str], emulator: Emulator) -> None:
    gw, key = cached
    client = gw.openai(key)
    first = await client.chat.completions.with_raw_response.create(
        model="gpt-5.4-mini", messages=ask()
    )  # type: ignore[arg-type]
    second = await client.chat.completions.with_raw_response.create(
        model="gpt-5.4-mini", messages=ask()
    )  # type: ignore[arg-type]
    assert first.headers["x-tollway-cache"] == "miss"
    assert second.headers["x-tollway-cache"] == "hit"
    assert await calls(emulator) == 1
    a, b = first.parse(), second.parse()
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage == b.usage
    other = await client.chat.completions.with_raw_response.create(
        model="gpt-5.4-mini", messages=ask("else")
    )  # type: ignore[arg-type]
    assert other.headers["x-tollway-cache"] == "miss"
    assert await calls(emulator) == 2


async def test_tenants_are_isolated_unless_global(make_gateway: Any, emulator: Emulator) -> None:
    gw = await make_gateway(chain(), base=BASE)
    a, b = await gw.create_key("alice", "pro"), await gw.create_key("bob", "pro")
    await emulator.reset()
    await gw.openai(a).chat.completions.create(model="gpt-5.4-mini", messages=ask())  # type: ignore[arg-type]
    raw = await gw.openai(b).chat.completions.with_raw_response.create(
        model="gpt-5.4-mini", messages=ask()
    )  # type: ignore[arg-type]
    assert raw.headers["x-tollway-cache"] == "miss"
    assert await calls(emulator) == 2
    gw2 = await make_gateway(chain(scope="global"), base=BASE)
    c, d = await gw2.create_key("carl", "pro"), await gw2.create_key("dora", "pro")
    await gw2.openai(c).chat.completions.create(model="gpt-5.4-mini", messages=ask())  # type: ignore[arg-type]
    raw = await gw2.openai(d).chat.completions.with_raw_response.create(
        model="gpt-5.4-mini", messages=ask()
    )  # type: ignore[arg-type]
    assert raw.headers["x-tollway-cache"] == "hit"


async def test_ttl_per_feature_and_never(cached: tuple[Gw, str], emulator: Emulator) -> None:
    gw, key = cached
    client = gw.openai(key)

    async def status(feature: str) -> str:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-5.4-mini",
            messages=ask(f"ttl {feature}"),  # type: ignore[arg-type]
            extra_headers={"X-Tollway-Feature": feature},
        )
        return str(raw.headers["x-tollway-cache"])

    assert [await status("quick"), await status("quick")] == ["miss", "hit"]
    assert [await status("code_suggestions"), await status("code_suggestions")] == ["miss", "hit"]
    await asyncio.sleep(0.4)
    assert await status("quick") == "miss"  # 300 ms TTL expired
    assert await status("code_suggestions") == "hit"  # 1 h TTL did not
    assert [await status("private"), await status("private")] == ["bypass", "bypass"]


async def test_cache_control(cached: tuple[Gw, str], emulator: Emulator) -> None:
    gw, key = cached
    client = gw.openai(key)

    async def status(text: str, cc: str | None = None) -> str:
        headers = {"Cache-Control": cc} if cc else {}
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-5.4-mini", messages=ask(text), extra_headers=headers
        )  # type: ignore[arg-type]
        return str(raw.headers["x-tollway-cache"])

    assert await status("cc1", "no-store") == "miss"
    assert await status("cc1") == "miss"  # nothing was stored
    assert await status("cc1") == "hit"
    assert await status("cc1", "no-cache") == "miss"  # the read is skipped...
    n = await calls(emulator)
    assert await status("cc1") == "hit"  # ...and the entry is still there
    assert await calls(emulator) == n


async def test_stream_and_whole_share_one_answer(
    cached: tuple[Gw, str], emulator: Emulator
) -> None:
    gw, key = cached
    client = gw.openai(key)
    whole = await client.chat.completions.create(model="gpt-5.4-mini", messages=ask("s1"))  # type: ignore[arg-type]
    stream = await client.chat.completions.create(
        model="gpt-5.4-mini",
        messages=ask("s1"),
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )
    assert (
        chunks[-1].usage is not None
        and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )  # type: ignore[union-attr]
    assert await calls(emulator) == 1
    # the reverse: a streamed miss, then a whole hit
    stream = await client.chat.completions.create(
        model="gpt-5.4-mini", messages=ask("s2"), stream=True
    )  # type: ignore[arg-type]
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-5.4-mini", messages=ask("s2")
    )  # type: ignore[arg-type]
    assert raw.headers["x-tollway-cache"] == "hit"
    assert raw.parse().choices[0].message.content == text
    assert await calls(emulator) == 2
    # Anthropic clients too
    ant = gw.anthropic(key)
    msg = await ant.messages.create(model="claude-sonnet", max_tokens=50, messages=ask("s3"))  # type: ignore[arg-type]
    async with ant.messages.stream(model="claude-sonnet", max_tokens=50, messages=ask("s3")) as s:  # type: ignore[arg-type]
        final = await s.get_final_message()
    assert final.content[0].text == msg.content[0].text  # type: ignore[union-attr]
    assert final.usage.output_tokens == msg.usage.output_tokens
    assert await calls(emulator) == 3


async def test_encrypted_at_rest_and_tampering(cached: tuple[Gw, str], emulator: Emulator) -> None:
    gw, key = cached
    client = gw.openai(key)
    reply = await client.chat.completions.create(model="gpt-5.4-mini", messages=ask())  # type: ignore[arg-type]
    store = gw.app[RESOURCES].find(STORE)
    assert store is not None
    backend = store.backend
    raw_entries = list(backend._store.values()) if hasattr(backend, "_store") else []
    blob = b"".join(e if isinstance(e, bytes) else repr(e).encode() for e in raw_entries)
    assert blob, "the memory backend should hold the entry"
    assert (
        b"swordfish" not in blob and (reply.choices[0].message.content or "x").encode() not in blob
    )
    # tamper with every stored entry: the next read is a miss, counted, never an error
    before = store.stats.decrypt_failures
    for k, v in list(backend._store.items()):
        value = v[0] if isinstance(v, tuple) else v
        if isinstance(value, bytes | bytearray):
            flipped = bytes(value[:-1]) + bytes([value[-1] ^ 1])
            backend._store[k] = (flipped, *v[1:]) if isinstance(v, tuple) else flipped
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-5.4-mini", messages=ask()
    )  # type: ignore[arg-type]
    assert raw.headers["x-tollway-cache"] == "miss"
    assert store.stats.decrypt_failures == before + 1


async def test_key_rotation_through_reload(
    make_gateway: Any, emulator: Emulator, tmp_path: Path
) -> None:
    path = tmp_path / "policy.yaml"
    gw = await make_gateway(chain(key=KEY_A), base=BASE, path=path)
    key = await gw.create_key("rot", "pro")
    client = gw.openai(key)
    await client.chat.completions.create(model="gpt-5.4-mini", messages=ask("rotate"))  # type: ignore[arg-type]
    text = path.read_text().replace(f"key: '{KEY_A}'", f"key: '{KEY_B}', old_keys: ['{KEY_A}']")
    path.write_text(text)
    async with gw.http.post(
        f"{gw.url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as r:
        assert r.status == 200, await r.text()
    n = await calls(emulator)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-5.4-mini", messages=ask("rotate")
    )  # type: ignore[arg-type]
    assert raw.headers["x-tollway-cache"] == "hit"  # the old key still reads old entries
    assert await calls(emulator) == n
    path.write_text(text.replace(f", old_keys: ['{KEY_A}']", ""))
    async with gw.http.post(
        f"{gw.url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as r:
        assert r.status == 200
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-5.4-mini", messages=ask("rotate")
    )  # type: ignore[arg-type]
    assert raw.headers["x-tollway-cache"] == "miss"  # key A retired: its entry no longer reads
