"""Every request field across dialects: translated, emulated, refused or ignored, never dropped.

One test per row of ``proxy/translate/fields.py`` (the table docs/translation.md renders): the
row's example goes through a gateway with the official SDK of the client's dialect to a model
of the other provider's, and the test checks what the emulator received as the provider
(``/_emulator/last``), or the 400 naming the field. So a translation that loses a field, or a
table that claims one it does not do, fails here. Then the behaviour behind the rows that
need more than the provider's body: structured outputs parsed by both SDKs, n choices (with
their usage metered), thinking, and fields passing untouched on a same-dialect route.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pydantic
import pytest

from proxy.translate.fields import TABLES, Direction, Field
from tests.conftest import ADMIN_KEY, Emulator, Gw, policy

PROMPT = "Say hi"
CLAUDE = "claude-sonnet"  # served by the Anthropic provider (upstream claude-sonnet-5)
GPT = "gpt-5.4-mini"  # served by the OpenAI provider
MAX_TOKENS = 64  # what the Anthropic client always sends (its SDK requires it)

ROWS = [(direction, f) for direction, table in TABLES.items() for f in table.values()]


def row_id(row: tuple[Direction, Field]) -> str:
    return f"{row[0]}:{row[1].name}"


class Person(pydantic.BaseModel):
    name: str
    age: int


# --- sending one body with each SDK ------------------------------------------------------------


def _split(params: Mapping[str, Any], method: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The SDK method's own keyword arguments, and the rest as ``extra_body`` (fields the SDK
    does not declare: Anthropic's sampling fields, beta fields)."""
    declared = inspect.signature(method).parameters
    kwargs = {k: v for k, v in params.items() if k in declared}
    extra = {k: v for k, v in params.items() if k not in declared}
    return kwargs, extra


async def send_openai(gw: Gw, key: str, fields: Mapping[str, Any]) -> Any:
    """An OpenAI client's chat completion to the Claude model: the reply, or the chunks."""
    client = gw.openai(key)
    params = {"model": CLAUDE, "messages": [{"role": "user", "content": PROMPT}], **fields}
    kwargs, extra = _split(params, client.chat.completions.create)
    reply = await client.chat.completions.create(**kwargs, extra_body=extra or None)
    if params.get("stream"):
        return [chunk async for chunk in reply]
    return reply


async def send_anthropic(gw: Gw, key: str, fields: Mapping[str, Any]) -> Any:
    """An Anthropic client's message to the OpenAI model: the reply, or the events."""
    client = gw.anthropic(key)
    params = {
        "model": GPT,
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": PROMPT}],
        **fields,
    }
    kwargs, extra = _split(params, client.messages.create)
    reply = await client.messages.create(**kwargs, extra_body=extra or None)
    if params.get("stream"):
        return [event async for event in reply]
    return reply


async def send(direction: Direction, gw: Gw, key: str, fields: Mapping[str, Any]) -> Any:
    if direction == "openai->anthropic":
        return await send_openai(gw, key, fields)
    return await send_anthropic(gw, key, fields)


async def calls(emulator: Emulator) -> int:
    return int((await emulator.stats())["requests"])


async def upstream_body(emulator: Emulator) -> dict[str, Any]:
    last = await emulator.last()
    body = last["body"]
    assert isinstance(body, dict)
    return body


async def assert_refused(
    direction: Direction, gw: Gw, key: str, emulator: Emulator, fields: Mapping[str, Any], name: str
) -> None:
    """A 400 in the client's error shape naming ``name``; the provider was not called."""
    before = await calls(emulator)
    if direction == "openai->anthropic":
        with pytest.raises(openai.BadRequestError) as oe:
            await send(direction, gw, key, fields)
        assert oe.value.param == name, oe.value.body
        assert oe.value.code == "unsupported_parameter"
    else:
        with pytest.raises(anthropic.BadRequestError) as ae:
            await send(direction, gw, key, fields)
        error = ae.value.body["error"]  # type: ignore[index]
        assert error["type"] == "invalid_request_error"
        assert f"'{name}'" in error["message"], error
    assert await calls(emulator) == before, "a refused request reached the provider"


def assert_sent(received: Mapping[str, Any], sent: Mapping[str, Any]) -> None:
    for key, value in sent.items():
        assert received.get(key) == value, (key, received.get(key), value)


# --- one test per row of the table -------------------------------------------------------------


@pytest.mark.parametrize(("direction", "spec"), ROWS, ids=list(map(row_id, ROWS)))
async def test_field(
    direction: Direction, spec: Field, gw: Gw, key: str, emulator: Emulator
) -> None:
    fields = {**spec.needs, spec.name: spec.example}
    if spec.decision == "refused":
        await assert_refused(direction, gw, key, emulator, fields, spec.name)
        for value in (None, *spec.harmless):  # asks for nothing: accepted, not sent
            await send(direction, gw, key, {spec.name: value})
            assert spec.name not in await upstream_body(emulator)
        return
    before = await calls(emulator)
    reply = await send(direction, gw, key, fields)
    received = await upstream_body(emulator)
    assert_sent(received, spec.sent)
    if spec.name not in spec.sent:  # the provider's API has no field of that name
        assert spec.name not in received, received
    if spec.decision == "emulated":  # n: that many provider calls, one reply with every choice
        assert spec.name == "n"
        assert await calls(emulator) - before == spec.example
        assert [c.index for c in reply.choices] == list(range(spec.example))
    else:
        assert await calls(emulator) - before == 1
    if spec.refused is not None:
        await assert_refused(direction, gw, key, emulator, spec.refused, spec.name)


def test_every_sdk_field_has_a_row() -> None:
    """The tables cover every request field of both SDKs' create calls, so a field added by a
    new SDK release is decided, not dropped; and they claim no field the SDKs do not have
    (beyond Anthropic's beta and sampling fields)."""
    from anthropic.types import message_create_params as anthropic_params
    from anthropic.types.beta import message_create_params as beta_params
    from openai.types.chat import completion_create_params as openai_params

    def names(*types: Any) -> set[str]:
        return {k for t in types for k in t.__annotations__}

    chat = names(
        openai_params.CompletionCreateParamsBase, openai_params.CompletionCreateParamsStreaming
    )
    assert set(TABLES["openai->anthropic"]) == chat
    headers = {"betas", "user_profile_id", "workspace_id"}  # the SDK sends them as headers
    messages = names(
        anthropic_params.MessageCreateParamsBase, anthropic_params.MessageCreateParamsStreaming
    )
    messages -= headers
    beta = names(beta_params.MessageCreateParamsBase) - headers
    sampling = {"temperature", "top_p", "top_k"}  # older SDKs' fields, still in the API
    assert messages <= set(TABLES["anthropic->openai"])
    assert set(TABLES["anthropic->openai"]) <= messages | beta | sampling


# --- behaviour behind the rows ------------------------------------------------------------------


async def test_openai_parse_with_a_claude_model(gw: Gw, key: str, emulator: Emulator) -> None:
    """The issue's case: ``parse(response_format=Person)`` to a Claude model reaches Anthropic
    with the schema, and the JSON answer parses into the model."""
    client = gw.openai(key)
    reply = await client.chat.completions.parse(
        model=CLAUDE,
        messages=[{"role": "user", "content": "Ada is 36"}],
        response_format=Person,
    )
    person = reply.choices[0].message.parsed
    assert isinstance(person, Person)
    schema = (await upstream_body(emulator))["output_config"]["format"]["schema"]
    assert set(schema["properties"]) == {"name", "age"}


async def test_anthropic_parse_with_an_openai_model(gw: Gw, key: str, emulator: Emulator) -> None:
    client = gw.anthropic(key)
    reply = await client.messages.parse(
        model=GPT,
        max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": "Ada is 36"}],
        output_format=Person,
    )
    assert isinstance(reply.parsed_output, Person)
    fmt = (await upstream_body(emulator))["response_format"]
    assert fmt["type"] == "json_schema"
    assert set(fmt["json_schema"]["schema"]["properties"]) == {"name", "age"}
    assert fmt["json_schema"]["strict"] is True  # the SDK's schema is closed and all required


async def test_openai_streamed_json_from_claude(gw: Gw, key: str) -> None:
    client = gw.openai(key)
    async with client.chat.completions.stream(
        model=CLAUDE, messages=[{"role": "user", "content": "Ada"}], response_format=Person
    ) as stream:
        final = await stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Person)


async def test_n_choices_from_claude_are_metered(
    make_gateway: Any, tmp_path: Path, emulator: Emulator
) -> None:
    """n=3 to a Claude model: three provider calls, three choices, and the usage (the reply's
    and the metered row's) is what the three calls reported together."""
    db = tmp_path / "usage.duckdb"
    gw = await make_gateway(
        "chain:\n  - name: auth\n"
        f"  - name: metering\n    config: {{database: {db}, flush_interval: 50ms}}\n"
    )
    key = await gw.create_key("nina", "pro")
    client = gw.openai(key)
    messages: Any = [{"role": "user", "content": "three words here"}]
    one = await client.chat.completions.create(model=CLAUDE, messages=messages)
    before = await calls(emulator)
    three = await client.chat.completions.create(model=CLAUDE, messages=messages, n=3)
    assert await calls(emulator) - before == 3
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}
    assert one.usage is not None and three.usage is not None
    assert three.usage.prompt_tokens == 3 * one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert three.usage.total_tokens == 3 * one.usage.total_tokens
    async with gw.http.post(
        f"{gw.url}/admin/sql",
        json={"query": "SELECT input_tokens, output_tokens, cost_usd FROM usage ORDER BY ts"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ) as r:
        assert r.status == 200, await r.text()
        rows = (await r.json())["rows"]
    assert len(rows) == 2
    assert rows[1][:2] == [three.usage.prompt_tokens, three.usage.completion_tokens]
    assert Decimal(str(rows[1][2])) == 3 * Decimal(str(rows[0][2]))


async def test_n_choices_fail_as_one(gw: Gw, key: str, emulator: Emulator) -> None:
    """One of the n calls failing fails the request with the provider's error, in the
    client's shape (here every call fails: the emulator's injected status)."""
    client = gw.openai(key)
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model=CLAUDE,
            messages=[{"role": "user", "content": PROMPT}],
            n=2,
            extra_headers={"x-emulator-status": "400"},
        )


async def test_an_unknown_field_is_refused(gw: Gw, key: str, emulator: Emulator) -> None:
    """A field no table knows (a misspelling, a newer field) cannot be translated: refused."""
    await assert_refused("openai->anthropic", gw, key, emulator, {"temperatur": 0.5}, "temperatur")
    await assert_refused("anthropic->openai", gw, key, emulator, {"top_n": 3}, "top_n")


async def test_bad_n_is_refused(gw: Gw, key: str, emulator: Emulator) -> None:
    for n in (0, 129, "two"):
        await assert_refused("openai->anthropic", gw, key, emulator, {"n": n}, "n")


async def test_reasoning_effort_to_claude_thinks_and_answers_in_text(
    gw: Gw, key: str, emulator: Emulator
) -> None:
    """Claude thinks (a thinking block comes back from the provider), and the OpenAI client
    gets the answer as its content, whole and streamed: chat completions carry no reasoning
    text."""
    client = gw.openai(key)
    messages: Any = [{"role": "user", "content": PROMPT}]
    reply = await client.chat.completions.create(
        model=CLAUDE, messages=messages, reasoning_effort="medium", max_completion_tokens=9000
    )
    assert reply.choices[0].message.content == f"Echo: {PROMPT}"
    sent = await upstream_body(emulator)
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 8192}
    assert sent["max_tokens"] == 9000
    stream = await client.chat.completions.create(
        model=CLAUDE, messages=messages, reasoning_effort="low", stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == f"Echo: {PROMPT}"


async def test_emulator_thinks_when_asked(gw: Gw, key: str) -> None:
    """The emulator as Anthropic: a thinking block before the answer, whole and streamed,
    and a budget the API refuses is refused."""
    client = gw.anthropic(key)
    messages: Any = [{"role": "user", "content": PROMPT}]
    thinking: Any = {"type": "enabled", "budget_tokens": 1024}
    reply = await client.messages.create(
        model=CLAUDE, max_tokens=2000, messages=messages, thinking=thinking
    )
    assert [b.type for b in reply.content] == ["thinking", "text"]
    async with client.messages.stream(
        model=CLAUDE, max_tokens=2000, messages=messages, thinking=thinking
    ) as stream:
        final = await stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].signature  # type: ignore[union-attr]
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.create(
            model=CLAUDE, max_tokens=1000, messages=messages, thinking=thinking
        )


async def test_thinking_to_openai_asks_for_reasoning(gw: Gw, key: str, emulator: Emulator) -> None:
    client = gw.anthropic(key)
    messages: Any = [{"role": "user", "content": PROMPT}]
    for thinking, effort in (
        ({"type": "enabled", "budget_tokens": 1024}, "low"),
        ({"type": "enabled", "budget_tokens": 10000}, "medium"),
        ({"type": "enabled", "budget_tokens": 20000}, "high"),
        ({"type": "enabled", "budget_tokens": 40000}, "xhigh"),
        ({"type": "enabled", "budget_tokens": 70000}, "max"),
        ({"type": "disabled"}, "none"),
        ({"type": "adaptive"}, None),
    ):
        reply = await client.messages.create(
            model=GPT, max_tokens=MAX_TOKENS, messages=messages, thinking=thinking
        )
        assert reply.content[0].type == "text"
        assert (await upstream_body(emulator)).get("reasoning_effort") == effort, thinking
    await client.messages.create(
        model=GPT,
        max_tokens=MAX_TOKENS,
        messages=messages,
        thinking={"type": "enabled", "budget_tokens": 1024},
        output_config={"effort": "high"},
    )
    assert (await upstream_body(emulator))["reasoning_effort"] == "high"  # the explicit one


async def test_same_dialect_fields_pass_untouched(gw: Gw, key: str, emulator: Emulator) -> None:
    """An OpenAI client on an OpenAI model: fields a Claude model would refuse reach the
    provider as they were sent, and the emulator answers n choices itself."""
    client = gw.openai(key)
    fields = {"logprobs": True, "top_logprobs": 2, "seed": 7, "presence_penalty": 0.5}
    reply = await client.chat.completions.create(
        model=GPT, messages=[{"role": "user", "content": PROMPT}], n=2, **fields
    )
    assert [c.index for c in reply.choices] == [0, 1]
    assert_sent(await upstream_body(emulator), {**fields, "n": 2})
    anth = gw.anthropic(key)
    await anth.messages.create(
        model=CLAUDE,
        max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": PROMPT}],
        extra_body={"top_k": 5, "inference_geo": "us"},
    )
    assert_sent(await upstream_body(emulator), {"top_k": 5, "inference_geo": "us"})


async def test_emulator_streams_n_choices(gw: Gw, key: str) -> None:
    client = gw.openai(key)
    stream = await client.chat.completions.create(
        model=GPT, messages=[{"role": "user", "content": PROMPT}], n=2, stream=True
    )
    texts = ["", ""]
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [f"Echo: {PROMPT}"] * 2


async def test_n_choices_fall_back_as_a_whole(make_gateway: Any, emulator: Emulator) -> None:
    """A failing provider: the n-choice request goes to the fallback as a whole, n calls
    again when the fallback is a Claude model too, one native call when it is OpenAI's."""
    base = policy(
        models={
            "overloaded": {"provider": "anthropic", "upstream_model": "emu-status-529"},
            "broken": {"provider": "openai", "upstream_model": "emu-status-503"},
        }
    )
    chain = [
        {"name": "auth"},
        {
            "name": "routing",
            "config": {"fallbacks": {"overloaded": ["claude-sonnet"], "broken": ["claude-sonnet"]}},
        },
    ]
    gw = await make_gateway(chain, base=base)
    client = gw.openai(await gw.create_key("ann", "pro"))
    for model in ("overloaded", "broken"):
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], n=2
        )
        assert raw.headers["x-tollway-model"] == "claude-sonnet"
        reply = raw.parse()
        assert [c.message.content for c in reply.choices] == [f"Echo: {PROMPT}"] * 2
        assert (await emulator.last())["body"]["model"] == "claude-sonnet-5"
