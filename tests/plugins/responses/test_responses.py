"""The responses plugin over HTTP with the openai SDK: conversations, retrieval, deletion,
tenants, erasure, encryption at rest, expiry, and two gateways sharing Redis."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from hashlib import sha256
from pathlib import Path
from typing import Any

import openai
import pytest
import redis.asyncio as aioredis

from plugins.responses.backend import MemoryBackend
from plugins.responses.plugin import STORE
from plugins.responses.store import NAMESPACE, ResponseStore
from proxy.appkeys import RESOURCES
from tests.conftest import ADMIN_KEY, Emulator, Gw, config_error, policy

SECRET = "the launch code is zebra-quartz-77"
CHAIN = [{"name": "auth"}, {"name": "responses"}]
KEY = "00" * 32

# an OpenAI-compatible provider that serves only chat completions: translated, gateway-kept
BASE = policy(
    providers={
        "compat": {
            "kind": "openai",
            "base_url": "{emu}/v1",
            "api_key": "upstream-secret",
            "responses": "chat",
        }
    },
    models={"compat-mini": {"provider": "compat", "upstream_model": "gpt-5.4-mini"}},
)


def store_of(gw: Gw) -> ResponseStore:
    store = gw.app[RESOURCES].find(STORE)
    assert store is not None
    return store


def user_texts(body: dict[str, Any]) -> str:
    """Everything the provider was sent, as one string (whatever its dialect)."""
    return str(body)


@pytest.fixture
async def gw(make_gateway: Callable[..., Any]) -> Gw:
    return await make_gateway(CHAIN, base=BASE)  # type: ignore[no-any-return]


async def two_turns(client: openai.AsyncOpenAI, first: str, second: str) -> tuple[Any, Any]:
    r1 = await client.responses.create(model=first, input=f"Remember this: {SECRET}")
    r2 = await client.responses.create(
        model=second, input="What did I ask you to remember?", previous_response_id=r1.id
    )
    return r1, r2


@pytest.mark.parametrize("model", ["claude-sonnet", "compat-mini"])
async def test_translated_conversation_is_expanded(gw: Gw, emulator: Emulator, model: str) -> None:
    client = gw.openai(await gw.create_key())
    r1, r2 = await two_turns(client, model, model)
    sent = (await emulator.last())["body"]
    # the provider got the whole conversation: the first turn's input and its answer
    assert SECRET in user_texts(sent)
    assert r1.output_text in user_texts(sent)
    assert "previous_response_id" not in sent
    assert r2.previous_response_id == r1.id  # the reply still names the turn it continued
    got = await client.responses.retrieve(r2.id)
    assert got.id == r2.id and got.output_text == r2.output_text
    assert got.previous_response_id == r1.id


async def test_native_conversation_passes_the_id(gw: Gw, emulator: Emulator) -> None:
    client = gw.openai(await gw.create_key())
    r1, r2 = await two_turns(client, "gpt-5.4-mini", "gpt-5.4-mini")
    last = await emulator.last()
    assert last["path"] == "/v1/responses"
    assert last["body"]["previous_response_id"] == r1.id  # the provider keeps the thread
    assert SECRET not in user_texts(last["body"])
    assert r2.previous_response_id == r1.id
    got = await client.responses.retrieve(r1.id)  # asked of the provider
    assert got.id == r1.id and got.output_text == r1.output_text
    assert (await emulator.last())["path"] == f"/v1/responses/{r1.id}"


async def test_a_conversation_moves_between_native_and_translated(
    gw: Gw, emulator: Emulator
) -> None:
    client = gw.openai(await gw.create_key())
    r1, r2 = await two_turns(client, "gpt-5.4-mini", "claude-sonnet")
    sent = (await emulator.last())["body"]
    assert (await emulator.last())["path"] == "/v1/messages"
    assert SECRET in user_texts(sent) and r1.output_text in user_texts(sent)
    r3 = await client.responses.create(
        model="gpt-5.4-mini", input="And now?", previous_response_id=r2.id
    )
    last = await emulator.last()
    assert last["path"] == "/v1/responses" and "previous_response_id" not in last["body"]
    items = last["body"]["input"]
    assert SECRET in str(items) and r2.output_text in str(items)
    # items made elsewhere go without the ids this provider would look up as its own
    assert all("id" not in i for i in items if isinstance(i, dict))
    assert r3.previous_response_id == r2.id


async def test_input_items_pages_and_delete(gw: Gw) -> None:
    client = gw.openai(await gw.create_key())
    r1, r2 = await two_turns(client, "claude-sonnet", "claude-sonnet")
    listed = await client.responses.input_items.list(r2.id)
    # the whole conversation r2 was made from, newest first by default
    assert len(listed.data) == 3
    assert listed.data[0].content[0].text == "What did I ask you to remember?"  # type: ignore[union-attr]
    asc = await client.responses.input_items.list(r2.id, order="asc", limit=1)
    assert asc.has_more and SECRET in asc.data[0].content[0].text  # type: ignore[union-attr]
    rest = await client.responses.input_items.list(r2.id, order="asc", after=asc.data[0].id)
    assert [i.id for i in rest.data] == [i.id for i in reversed(listed.data)][1:]
    with pytest.raises(openai.BadRequestError):
        await client.responses.input_items.list(r2.id, limit=101)
    deleted = await client.responses.delete(r1.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(r1.id)
    with pytest.raises(openai.NotFoundError) as info:
        await client.responses.create(
            model="claude-sonnet", input="again", previous_response_id=r1.id
        )
    assert info.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert await client.responses.retrieve(r2.id)  # r2 holds its conversation itself


async def test_delete_a_native_response_deletes_it_at_the_provider(
    gw: Gw, emulator: Emulator
) -> None:
    client = gw.openai(await gw.create_key())
    r1 = await client.responses.create(model="gpt-5.4-mini", input="hello")
    items = await client.responses.input_items.list(r1.id)
    assert items.data and items.data[0].type == "message"
    await client.responses.delete(r1.id)
    async with emulator.http.get(
        f"{emulator.url}/v1/responses/{r1.id}",
        headers={"Authorization": "Bearer upstream-secret"},
    ) as r:
        assert r.status == 404
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(r1.id)


@pytest.mark.parametrize("model", ["claude-sonnet", "gpt-5.4-mini"])
async def test_streamed_replies_are_recorded(gw: Gw, emulator: Emulator, model: str) -> None:
    client = gw.openai(await gw.create_key())
    stream = await client.responses.create(model=model, input=SECRET, stream=True)
    final = None
    async for event in stream:
        if event.type == "response.completed":
            final = event.response
    assert final is not None
    got = await client.responses.retrieve(final.id)
    assert got.output_text == final.output_text
    stream2 = await client.responses.create(
        model="claude-sonnet", input="again?", previous_response_id=final.id, stream=True
    )
    kinds = {}
    async for event in stream2:
        kinds[event.type] = event
    done = kinds["response.completed"].response  # type: ignore[attr-defined]
    assert done.previous_response_id == final.id
    assert kinds["response.created"].response.previous_response_id == final.id  # type: ignore[attr-defined]
    assert SECRET in user_texts((await emulator.last())["body"])


async def test_store_false_is_not_kept(gw: Gw) -> None:
    client = gw.openai(await gw.create_key())
    r = await client.responses.create(model="claude-sonnet", input="hi", store=False)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="claude-sonnet", input="x", previous_response_id=r.id)


async def test_unknown_previous_response_is_a_404_in_openai_shape(gw: Gw) -> None:
    client = gw.openai(await gw.create_key())
    with pytest.raises(openai.NotFoundError) as info:
        await client.responses.create(
            model="gpt-5.4-mini", input="x", previous_response_id="resp_nope"
        )
    assert info.value.body == {  # type: ignore[comparison-overlap]
        "message": "Previous response with id 'resp_nope' not found.",
        "type": "invalid_request_error",
        "param": "previous_response_id",
        "code": "previous_response_not_found",
    }


async def test_routes_need_a_gateway_key(gw: Gw) -> None:
    async with gw.http.get(f"{gw.url}/v1/responses/resp_x") as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "missing_api_key"
    async with gw.http.delete(
        f"{gw.url}/v1/responses/resp_x", headers={"Authorization": "Bearer nope"}
    ) as r:
        assert r.status == 401


@pytest.mark.parametrize("model", ["claude-sonnet", "gpt-5.4-mini"])
async def test_another_users_key_gets_404_everywhere(gw: Gw, model: str) -> None:
    alice = gw.openai(await gw.create_key("alice"))
    bob = gw.openai(await gw.create_key("bob"))
    r = await alice.responses.create(model=model, input=SECRET)
    for call in (
        lambda: bob.responses.retrieve(r.id),
        lambda: bob.responses.input_items.list(r.id),
        lambda: bob.responses.delete(r.id),
        lambda: bob.responses.create(model=model, input="x", previous_response_id=r.id),
    ):
        with pytest.raises(openai.NotFoundError):
            await call()
    assert (await alice.responses.retrieve(r.id)).id == r.id  # bob's delete did nothing


async def test_erasure_removes_the_users_responses(gw: Gw, emulator: Emulator) -> None:
    alice = gw.openai(await gw.create_key("alice"))
    bob = gw.openai(await gw.create_key("bob"))
    kept = await alice.responses.create(model="claude-sonnet", input=SECRET)
    native = await alice.responses.create(model="gpt-5.4-mini", input=SECRET)
    other = await bob.responses.create(model="claude-sonnet", input="bob's")
    async with gw.http.delete(
        f"{gw.url}/admin/users/alice/data", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as r:
        assert r.status == 200, await r.text()
        deleted = (await r.json())["deleted"]
    assert deleted["responses"] == 2 and deleted["provider_responses"] == 1
    async with emulator.http.get(
        f"{emulator.url}/v1/responses/{native.id}",
        headers={"Authorization": "Bearer upstream-secret"},
    ) as r:
        assert r.status == 404  # the provider's copy is gone too
    alice2 = gw.openai(await gw.create_key("alice"))  # her keys went with her data
    for rid in (kept.id, native.id):
        with pytest.raises(openai.NotFoundError):
            await alice2.responses.retrieve(rid)
    assert (await bob.responses.retrieve(other.id)).id == other.id


async def test_records_are_not_plaintext_in_memory(gw: Gw) -> None:
    client = gw.openai(await gw.create_key("alice"))
    await two_turns(client, "claude-sonnet", "claude-sonnet")
    backend = store_of(gw).backend
    assert isinstance(backend, MemoryBackend)
    raw = b"".join(backend.raw())
    assert len(backend.raw()) == 2
    assert b"zebra-quartz" not in raw and b"alice" not in raw and b"launch" not in raw


async def test_records_expire_after_their_ttl(make_gateway: Callable[..., Any]) -> None:
    gw = await make_gateway(
        [{"name": "auth"}, {"name": "responses", "config": {"ttl": "1h"}}], base=BASE
    )
    client = gw.openai(await gw.create_key())
    r = await client.responses.create(model="claude-sonnet", input="hi")
    backend = store_of(gw).backend
    assert isinstance(backend, MemoryBackend)
    now = backend.clock()
    backend.clock = lambda: now + 3599  # an injected clock: no waiting
    assert (await client.responses.retrieve(r.id)).id == r.id
    backend.clock = lambda: now + 3601
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="claude-sonnet", input="x", previous_response_id=r.id)


def test_redis_state_needs_a_key(redis_url: str) -> None:
    base = (
        "version: 1\nadmin: {{key: {admin}}}\n"
        f"state: {{{{url: '{redis_url}', dir: null}}}}\n"
        "providers: {{openai: {{kind: openai, base_url: '{emu}/v1'}}}}\n"
        "models: {{m: {{provider: openai}}}}\n"
    )
    error = config_error("responses", "{}", base=base)
    assert "key" in error and "Redis" in error


async def test_two_gateways_share_conversations_on_redis(
    make_gateway: Callable[..., Any], redis_url: str, emulator: Emulator
) -> None:
    chain = [{"name": "auth"}, {"name": "responses", "config": {"key": KEY}}]
    base = policy(BASE, state={"url": redis_url})
    gw1 = await make_gateway(chain, base=base)
    gw2 = await make_gateway(chain, base=base)
    key = await gw1.create_key("alice")
    c1, c2 = gw1.openai(key), gw2.openai(key)
    for _ in range(250):  # until the key reached gw2 through Redis
        try:
            await c2.responses.retrieve("resp_none")
        except openai.NotFoundError:
            break
        except openai.AuthenticationError:
            await asyncio.sleep(0.02)
    r1 = await c1.responses.create(model="claude-sonnet", input=f"Remember: {SECRET}")
    r2 = await c2.responses.create(model="claude-sonnet", input="what?", previous_response_id=r1.id)
    assert SECRET in user_texts((await emulator.last())["body"])
    assert (await c2.responses.retrieve(r1.id)).output_text == r1.output_text
    listed = await c1.responses.input_items.list(r2.id)
    assert len(listed.data) == 3
    bob = gw1.openai(await gw1.create_key("bob"))
    with pytest.raises(openai.NotFoundError):
        await bob.responses.retrieve(r1.id)
    client = aioredis.from_url(redis_url)
    try:
        keys = await client.keys(NAMESPACE + "resp_*")
        assert len(keys) == 2
        raw = b"".join([await client.get(k) for k in keys])
        assert b"zebra-quartz" not in raw and b"launch" not in raw
    finally:
        await client.aclose()
    await c2.responses.delete(r1.id)
    with pytest.raises(openai.NotFoundError):
        await c1.responses.retrieve(r1.id)


async def test_an_unreachable_redis_is_a_503_never_a_500(
    make_gateway: Callable[..., Any],
) -> None:
    """Reads that cannot tell whether a response exists answer 503 with Retry-After; a reply
    whose record cannot be written still goes out."""
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    declared = {
        "id": "k1",
        "user": "alice",
        "tier": "pro",
        "sha256": sha256(b"sk-alice").hexdigest(),
    }
    chain = [
        {"name": "auth", "config": {"keys": [declared]}},
        {"name": "responses", "config": {"key": KEY}},
    ]
    gw = await make_gateway(chain, base=policy(BASE, state={"url": f"redis://127.0.0.1:{port}/0"}))
    client = gw.openai("sk-alice")
    r = await client.responses.create(model="claude-sonnet", input="hi")
    assert r.output_text
    for call in (
        lambda: client.responses.retrieve(r.id),
        lambda: client.responses.create(
            model="claude-sonnet", input="x", previous_response_id=r.id
        ),
    ):
        with pytest.raises(openai.APIStatusError) as info:
            await call()
        assert info.value.status_code == 503
        assert info.value.response.headers["Retry-After"]
        assert info.value.body["code"] == "state_unavailable"  # type: ignore[index]


async def test_a_path_that_is_no_response_id_is_a_404(gw: Gw) -> None:
    key = await gw.create_key("alice")
    await gw.openai(key).responses.create(model="claude-sonnet", input="hi")
    for rid in ("owner:alice", "a.b", "x" * 300):
        async with gw.http.get(
            f"{gw.url}/v1/responses/{rid}", headers={"Authorization": f"Bearer {key}"}
        ) as r:
            assert r.status == 404, rid
            assert (await r.json())["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("model", ["claude-sonnet", "gpt-5.4-mini"])
async def test_a_cached_answer_can_be_continued(
    make_gateway: Callable[..., Any], emulator: Emulator, model: str
) -> None:
    chain = [
        {"name": "auth"},
        {"name": "responses"},
        {"name": "cache", "config": {"default_ttl": 60}},
    ]
    gw = await make_gateway(chain, base=BASE)
    client = gw.openai(await gw.create_key("alice"))
    first = await client.responses.create(model=model, input=f"Remember: {SECRET}")
    hit = await client.responses.with_raw_response.create(model=model, input=f"Remember: {SECRET}")
    assert hit.headers["X-Tollway-Cache"] == "hit"
    again = hit.parse()
    assert (await client.responses.retrieve(again.id)).id == again.id
    follow = await client.responses.create(
        model="claude-sonnet", input="what?", previous_response_id=again.id
    )
    assert follow.previous_response_id == again.id
    assert SECRET in user_texts((await emulator.last())["body"])
    assert first.output_text == again.output_text


async def test_records_and_routes_outlive_a_reload(
    make_gateway: Callable[..., Any], tmp_path: Path
) -> None:
    path = tmp_path / "policy.yaml"
    chain = [{"name": "auth"}, {"name": "responses", "config": {"key": KEY}}]
    gw = await make_gateway(chain, base=BASE, path=path)
    client = gw.openai(await gw.create_key("alice"))
    r = await client.responses.create(model="claude-sonnet", input=SECRET)
    async with gw.http.post(
        f"{gw.url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as resp:
        assert resp.status == 200, await resp.text()
    assert gw.gateway.reloads == 1
    assert (await client.responses.retrieve(r.id)).output_text == r.output_text
    follow = await client.responses.create(
        model="claude-sonnet", input="x", previous_response_id=r.id
    )
    assert follow.previous_response_id == r.id
