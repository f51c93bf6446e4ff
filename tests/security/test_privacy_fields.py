"""Privacy covers every text a provider reads, in every form personal data can be written.

A property test builds random requests of both dialects with a personal value (from every
detector's family, look-alike and zero-width forms included) in a random text-bearing field,
sends each through a real `tollway serve` with the privacy plugin, and checks that the
emulator (the provider) received the request, the text around the value, and never the value,
as written or normalised. Explicit tests pin each newly covered field (through the official
SDKs), each new detector form, and that signed thinking blocks reach the provider unchanged.
"""

from __future__ import annotations

import itertools
import json
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plugins.privacy import ALL_KINDS, Redactor
from proxy.texts import text_slots
from tests.conftest import Emulator, Gw, free_port
from tests.procs import TOLLWAY, Http, running


def wide(text: str) -> str:
    """``text`` in full-width forms (ASCII ``!``..``~`` are U+FF01..U+FF5E)."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


def arabic_indic(text: str) -> str:
    return "".join(chr(0x0660 + int(c)) if c.isdigit() else c for c in text)


ZWSP, WJ, SHY, BOM = "\u200b", "\u2060", "\u00ad", "\ufeff"

# (kind, value): every detector's family, in the forms it must see through
PII: list[tuple[str, str]] = [
    ("email", "jane.roe@example.org"),
    ("email", wide("jane.roe@example.org")),
    ("email", "jane.roe" + wide("@") + "example.org"),
    ("email", f"jane{ZWSP}.roe@exam{WJ}ple.org"),
    ("phone", "+44 20 7946 0958"),
    ("phone", "(415) 555-0100"),
    ("phone", wide("+44 20 7946 0958")),
    ("card", "4111 1111 1111 1111"),
    ("card", "5500-0000-0000-0004"),
    ("card", "4111.1111.1111.1111"),
    ("card", "4111/1111/1111/1111"),
    ("card", "4111  1111  1111  1111"),
    ("card", "3782.822463.10005"),
    ("card", wide("4111 1111 1111 1111")),
    ("card", f"4111{ZWSP}1111{ZWSP}1111{ZWSP}1111"),
    ("card", arabic_indic("4111 1111 1111 1111")),
    ("iban", "GB82 WEST 1234 5698 7654 32"),
    ("iban", "DE89370400440532013000"),
    ("ssn", "123-45-6789"),
    ("ssn", wide("123-45-6789")),
    ("ip", "10.20.30.40"),
    ("ip", wide("10.20.30.40")),
    ("secret", "sk-proj-Q1w2E3r4T5y6U7i8O9p0AsDf"),
    ("secret", f"sk-proj-Q1w2E3r4{ZWSP}T5y6U7i8O9p0AsDf"),
    ("secret", f"sk-proj-Q1w2E3r4{SHY}T5y6U7i8O9p0AsDf"),
    ("secret", f"ghp_{BOM}A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"),
    ("secret", "AKIAIOSFODNN7EXAMPLE"),
    ("secret", "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("secret", "Zk3h9Qw+Lm2Pz8Rt5Vb7Xn1Cd4Fg6Hj0Kl/Ma9Sp"),  # an AWS secret, no context
    ("secret", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N"),
]
ZERO_WIDTH = dict.fromkeys(
    map(ord, "\u00ad\u180e\u200b\u200c\u200d\u2060\u2061\u2062\u2063\u2064\ufeff")
)


def canon(text: str) -> str:
    """A text as a reader would take it: zero-width characters gone, look-alikes folded."""
    text = text.translate(ZERO_WIDTH)
    text = "".join(str(unicodedata.digit(c)) if c.isdecimal() else c for c in text)
    return unicodedata.normalize("NFKC", text)


def strings(value: Any) -> Iterator[str]:
    """Every string of a decoded JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


# ---- where a text can go: (name, endpoint, build(text, depth) -> body) -----------------------

Build = Callable[[str, int], dict[str, Any]]


def nest(value: Any, depth: int) -> Any:
    """``value`` ``depth`` levels down a JSON value of objects and arrays."""
    for level in range(depth):
        value = {"k": value, "n": level} if level % 2 else [1, value]
    return value


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "hi"}], **fields}


def chat_history(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"model": "gpt-5.4-mini", "messages": [*messages, {"role": "user", "content": "ok"}]}


def call(arguments: str) -> dict[str, Any]:
    return {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}


def assistant(depth: int, **fields: Any) -> dict[str, Any]:
    """An assistant message with ``fields``: with ``"content": null`` or without a content."""
    return {"role": "assistant", **({"content": None} if depth % 4 < 2 else {}), **fields}


def fn_tool(description: str = "d", prop: str = "p", enum: str = "e") -> dict[str, Any]:
    params = {
        "type": "object",
        "properties": {
            "type": {"type": "string", "description": prop, "enum": [enum, "x"]},
            "n": {"type": ["integer", "null"], "default": 0},
        },
        "required": ["type"],
    }
    return {
        "type": "function",
        "function": {"name": "f", "description": description, "parameters": params},
    }


def args(text: str, depth: int) -> str:
    """Arguments as JSON text; odd depths escape every non-ASCII character (json.dumps'
    default), even ones write them as they are."""
    return json.dumps({"q": nest(text, depth)}, ensure_ascii=bool(depth % 2))


def messages(*content: Any, system: Any = None, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "claude-sonnet", "max_tokens": 20, **fields}
    body["messages"] = [*content, {"role": "user", "content": "ok"}]
    if system is not None:
        body["system"] = system
    return body


def user(*blocks: Any) -> dict[str, Any]:
    return {"role": "user", "content": list(blocks)}


def tool_use(value: Any) -> dict[str, Any]:
    use = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": value}
    return {"role": "assistant", "content": [use]}


def tool_result(content: Any) -> dict[str, Any]:
    return user({"type": "tool_result", "tool_use_id": "toolu_1", "content": content})


def doc(source: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return user({"type": "document", "source": source, **extra}, {"type": "text", "text": "sum"})


def a_tool(description: str = "d", prop: str = "p") -> dict[str, Any]:
    schema = {"type": "object", "properties": {"q": {"type": "string", "description": prop}}}
    return {"name": "f", "description": description, "input_schema": schema}


def resp(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-5.4-mini", "input": "hi", **fields}


def resp_history(*items: dict[str, Any]) -> dict[str, Any]:
    return {"model": "gpt-5.4-mini", "input": [*items, {"role": "user", "content": "ok"}]}


def fn_call(arguments: str) -> dict[str, Any]:
    return {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": arguments}


def fn_output(output: Any) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": "call_1", "output": output}


CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
FIELDS: list[tuple[str, str, Build]] = [
    # OpenAI chat
    ("chat user content", CHAT, lambda t, d: chat(messages=[{"role": "user", "content": t}])),
    ("chat text part", CHAT, lambda t, d: chat(messages=[user({"type": "text", "text": t})])),
    ("chat system", CHAT, lambda t, d: chat_history({"role": "system", "content": t})),
    ("chat developer", CHAT, lambda t, d: chat_history({"role": "developer", "content": t})),
    ("chat assistant", CHAT, lambda t, d: chat_history({"role": "assistant", "content": t})),
    (
        "chat refusal",
        CHAT,
        lambda t, d: chat_history({"role": "assistant", "content": None, "refusal": t}),
    ),
    (
        "chat tool_calls arguments",
        CHAT,
        lambda t, d: chat_history(
            assistant(d, tool_calls=[call(args(t, d))]),
            {"role": "tool", "tool_call_id": "call_1", "content": "done"},
        ),
    ),
    (
        "chat tool message",
        CHAT,
        lambda t, d: chat_history(
            {"role": "assistant", "content": None, "tool_calls": [call("{}")]},
            {"role": "tool", "tool_call_id": "call_1", "content": t},
        ),
    ),
    (
        "chat function_call arguments",
        CHAT,
        lambda t, d: chat_history(
            assistant(d, function_call={"name": "f", "arguments": args(t, d)}),
            {"role": "function", "name": "f", "content": "done"},
        ),
    ),
    ("chat tool description", CHAT, lambda t, d: chat(tools=[fn_tool(description=t)])),
    ("chat parameter description", CHAT, lambda t, d: chat(tools=[fn_tool(prop=t)])),
    ("chat parameter enum", CHAT, lambda t, d: chat(tools=[fn_tool(enum=t)])),
    (
        "chat legacy functions",
        CHAT,
        lambda t, d: chat(functions=[fn_tool(description=t)["function"]]),
    ),
    (
        "chat response_format",
        CHAT,
        lambda t, d: chat(
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "answer",
                    "description": t if d % 2 else "an answer",
                    "schema": fn_tool(prop=t)["function"]["parameters"],
                },
            }
        ),
    ),
    ("chat prediction", CHAT, lambda t, d: chat(prediction={"type": "content", "content": t})),
    (
        "chat prediction parts",
        CHAT,
        lambda t, d: chat(prediction={"type": "content", "content": [{"type": "text", "text": t}]}),
    ),
    ("chat user", CHAT, lambda t, d: chat(user=t)),
    ("chat metadata", CHAT, lambda t, d: chat(metadata={"note": t}, store=True)),
    # OpenAI completions and embeddings
    ("completions prompt", "/v1/completions", lambda t, d: {"model": "gpt-5.4-mini", "prompt": t}),
    (
        "completions prompt list",
        "/v1/completions",
        lambda t, d: {"model": "gpt-5.4-mini", "prompt": ["a", t]},
    ),
    (
        "completions suffix",
        "/v1/completions",
        lambda t, d: {"model": "gpt-5.4-mini", "prompt": "def f():", "suffix": t},
    ),
    (
        "embeddings input",
        "/v1/embeddings",
        lambda t, d: {"model": "text-embedding-3-small", "input": ["a", t]},
    ),
    # Anthropic messages
    ("messages system", "/v1/messages", lambda t, d: messages(system=t)),
    (
        "messages system blocks",
        "/v1/messages",
        lambda t, d: messages(system=[{"type": "text", "text": t}]),
    ),
    ("messages user", "/v1/messages", lambda t, d: messages({"role": "user", "content": t})),
    (
        "messages text block",
        "/v1/messages",
        lambda t, d: messages(user({"type": "text", "text": t})),
    ),
    (
        "messages tool_use input",
        "/v1/messages",
        lambda t, d: messages(tool_use({"q": nest(t, d)}), tool_result("ok")),
    ),
    ("messages tool_result", "/v1/messages", lambda t, d: messages(tool_use({}), tool_result(t))),
    (
        "messages tool_result blocks",
        "/v1/messages",
        lambda t, d: messages(tool_use({}), tool_result([{"type": "text", "text": t}])),
    ),
    (
        "messages document text",
        "/v1/messages",
        lambda t, d: messages(doc({"type": "text", "media_type": "text/plain", "data": t})),
    ),
    (
        "messages document content",
        "/v1/messages",
        lambda t, d: messages(doc({"type": "content", "content": [{"type": "text", "text": t}]})),
    ),
    (
        "messages document title",
        "/v1/messages",
        lambda t, d: messages(
            doc({"type": "text", "media_type": "text/plain", "data": "x"}, title=t)
        ),
    ),
    (
        "messages document context",
        "/v1/messages",
        lambda t, d: messages(
            doc({"type": "text", "media_type": "text/plain", "data": "x"}, context=t)
        ),
    ),
    (
        "messages tool description",
        "/v1/messages",
        lambda t, d: messages(tools=[a_tool(description=t)]),
    ),
    ("messages input_schema", "/v1/messages", lambda t, d: messages(tools=[a_tool(prop=t)])),
    ("messages metadata", "/v1/messages", lambda t, d: messages(metadata={"user_id": t})),
    # OpenAI Responses
    ("responses input", RESPONSES, lambda t, d: resp(input=t)),
    ("responses instructions", RESPONSES, lambda t, d: resp(instructions=t)),
    ("responses message", RESPONSES, lambda t, d: resp_history({"role": "user", "content": t})),
    (
        "responses input_text",
        RESPONSES,
        lambda t, d: resp_history(
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": t}]}
        ),
    ),
    (
        "responses developer",
        RESPONSES,
        lambda t, d: resp_history({"role": "developer", "content": t}),
    ),
    (
        "responses output_text",
        RESPONSES,
        lambda t, d: resp_history(
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": t, "annotations": []}],
            }
        ),
    ),
    (
        "responses function_call arguments",
        RESPONSES,
        lambda t, d: resp_history(fn_call(args(t, d)), fn_output("done")),
    ),
    (
        "responses function_call_output",
        RESPONSES,
        lambda t, d: resp_history(fn_call("{}"), fn_output(t)),
    ),
    (
        "responses function_call_output parts",
        RESPONSES,
        lambda t, d: resp_history(fn_call("{}"), fn_output([{"type": "input_text", "text": t}])),
    ),
    (
        "responses tool description",
        RESPONSES,
        lambda t, d: resp(
            tools=[{"type": "function", "name": "f", "description": t, "parameters": {}}]
        ),
    ),
    (
        "responses parameter description",
        RESPONSES,
        lambda t, d: resp(tools=[{"type": "function", "name": "f", **fn_tool(prop=t)["function"]}]),
    ),
    (
        "responses text.format",
        RESPONSES,
        lambda t, d: resp(
            text={
                "format": {
                    "type": "json_schema",
                    "name": "answer",
                    "description": t if d % 2 else "an answer",
                    "schema": fn_tool(prop=t)["function"]["parameters"],
                }
            }
        ),
    ),
    ("responses safety_identifier", RESPONSES, lambda t, d: resp(safety_identifier=t)),
    ("responses metadata", RESPONSES, lambda t, d: resp(metadata={"note": t})),
]


# ---- the property test against a real `tollway serve` --------------------------------------

POLICY = """\
version: 1
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{key: privacy-admin}}
state: {{dir: null}}
providers:
  openai: {{kind: openai, base_url: "http://127.0.0.1:{emu}/v1", api_key: k, retries: {{attempts: 0}}}}
  anthropic: {{kind: anthropic, base_url: "http://127.0.0.1:{emu}", api_key: k, retries: {{attempts: 0}}}}
models:
  gpt-5.4-mini: {{provider: openai}}
  claude-sonnet: {{provider: anthropic}}
  text-embedding-3-small: {{provider: openai}}
features:
  basic_suggestions: {{price_per_request: 0.01}}
tiers:
  pro: {{features: [basic_suggestions]}}
chain:
  - name: auth
  - name: privacy
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Http, Http, str]]:
    """(gateway client, emulator client, key): one real gateway for every example."""
    emu, port = free_port(), free_port()
    policy: Path = tmp_path_factory.mktemp("privacy") / "policy.yaml"
    policy.write_text(POLICY.format(port=port, emu=emu))
    with (
        running([*TOLLWAY, "emulator", "--port", str(emu)], "emulator listening"),
        running([*TOLLWAY, "serve", "--policy", str(policy)], "tollway listening") as gw,
    ):
        client, provider = Http(port), Http(emu)
        yield client, provider, client.create_key("privacy-admin", "privacy", "pro")
        client.close()
        provider.close()
        assert "Traceback" not in gw.text()


markers = (f"zq{''.join(chr(97 + int(d)) for d in str(n))}" for n in itertools.count())


def send(
    served: tuple[Http, Http, str], endpoint: str, body: dict[str, Any]
) -> tuple[dict[str, str], Any]:
    """POST ``body``; the reply's headers and the body the provider received."""
    client, provider, key = served
    headers = {"Content-Type": "application/json"}
    if endpoint == "/v1/messages":
        headers |= {"x-api-key": key, "anthropic-version": "2023-06-01"}
    else:
        headers["Authorization"] = f"Bearer {key}"
    status, reply_headers, reply = client.post(endpoint, json.dumps(body).encode(), headers)
    assert status == 200, (status, reply[:300])
    _, _, last = provider.request("GET", "/_emulator/last")
    received = json.loads(last)
    assert received["path"] == endpoint
    return reply_headers, received["body"]


def assert_never_received(received: Any, marker: str, value: str) -> None:
    seen = "\n".join(strings(received))
    assert marker in seen, "the field did not reach the provider: the test would prove nothing"
    assert value not in seen, seen
    assert canon(value) not in canon(seen), seen


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    field=st.sampled_from(FIELDS),
    pii=st.sampled_from(PII),
    depth=st.integers(0, 4),
    before=st.sampled_from(["", "Contact: ", "see\n", "«", "note - "]),
    after=st.sampled_from(["", ".", " thanks", ")", "\n-- end"]),
    noise=st.lists(st.sampled_from(["hello", "the weather", "été", "x" * 40]), max_size=3),
)
def test_the_provider_never_receives_personal_data(
    served: tuple[Http, Http, str],
    field: tuple[str, str, Build],
    pii: tuple[str, str],
    depth: int,
    before: str,
    after: str,
    noise: list[str],
) -> None:
    name, endpoint, build = field
    kind, value = pii
    marker = next(markers)
    text = f"{' '.join(noise)} {marker} {before}{value}{after} ".strip()
    headers, received = send(served, endpoint, build(text, depth))
    redacted = dict(kv.split("=") for kv in headers.get("x-tollway-redacted", "=").split(","))
    assert kind in redacted, (name, value, headers)
    assert_never_received(received, marker, value)


def test_odd_shapes_are_walked_not_crashed_on(served: tuple[Http, Http, str]) -> None:
    """Blocks and fields of unexpected types: still scanned where they hold text, never a 500."""
    odd = messages(
        user({"type": ["thinking"], "text": "mail zqodd jane.roe@example.org"}, {"type": None}),
        tools=[{"name": "f", "description": 7, "input_schema": ["not", "a", "schema"]}],
        metadata=[[{"x": None}]],
    )
    _, received = send(served, "/v1/messages", odd)
    assert_never_received(received, "zqodd", "jane.roe@example.org")


def test_every_field_of_the_table_is_a_text_the_walker_finds() -> None:
    """The property test's fields and the walker agree: each field's value is one slot (so a
    field that stopped being walked fails here by name, not as a rare example)."""
    for name, _, build in FIELDS:
        body = build("VALUE", 2)
        found = [c[k] for c, k in text_slots(body)]
        assert any("VALUE" in t for t in found), name


# ---- each new field, through the official SDKs ---------------------------------------------

EMAIL, CARD, PHONE = "jane.roe@example.org", "4111.1111.1111.1111", "+44 20 7946 0958"
AWS = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def privacy_chain() -> str:
    return "chain:\n  - name: auth\n  - name: privacy\n"


async def test_openai_fields(make_gateway: Any, emulator: Emulator) -> None:
    gw: Gw = await make_gateway(privacy_chain())
    client = gw.openai(await gw.create_key())
    # arguments as json.dumps writes them: non-ASCII escaped, a newline before the phone
    arguments = json.dumps({"to": wide(EMAIL), "note": f"call\n{PHONE}", "n": 3})
    assert "\\uff20" in arguments and "\\n+44" in arguments
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-5.4-mini",
        messages=[
            {"role": "user", "content": "send it"},
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "send", "arguments": arguments},
            },
            {"role": "function", "name": "send", "content": "sent"},
            {"role": "user", "content": "thanks"},
        ],
        tools=[fn_tool(description=f"mails {EMAIL}", prop=f"card like {CARD}")],
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "a",
                "description": f"for {EMAIL}",
                "schema": {"type": "object"},
            },
        },
        prediction={"type": "content", "content": f"Dear {EMAIL},"},
        user=EMAIL,
    )
    assert raw.headers["x-tollway-redacted"] == "card=1,email=5,phone=1"
    sent = (await emulator.last())["body"]
    assert json.loads(sent["messages"][1]["function_call"]["arguments"]) == {
        "to": "[EMAIL]",
        "note": "call\n[PHONE]",
        "n": 3,
    }
    function = sent["tools"][0]["function"]
    assert function["name"] == "f" and function["description"] == "mails [EMAIL]"
    parameters = function["parameters"]
    assert parameters["properties"]["type"]["description"] == "card like [CARD]"
    assert parameters["required"] == ["type"] and parameters["properties"]["n"]["default"] == 0
    assert sent["response_format"]["json_schema"]["description"] == "for [EMAIL]"
    assert sent["prediction"]["content"] == "Dear [EMAIL],"
    assert sent["user"] == "[EMAIL]"
    await client.completions.create(model="gpt-5.4-mini", prompt="def mail():", suffix=f"# {AWS}\n")
    assert (await emulator.last())["body"]["suffix"] == "# [SECRET]\n"


async def test_anthropic_fields(make_gateway: Any, emulator: Emulator) -> None:
    gw: Gw = await make_gateway(privacy_chain())
    client = gw.anthropic(await gw.create_key())
    raw = await client.messages.with_raw_response.create(
        model="claude-sonnet",
        max_tokens=20,
        system=[{"type": "text", "text": f"Escalate to {EMAIL}"}],
        tools=[a_tool(description=f"pays {CARD}", prop=f"a phone such as {PHONE}")],
        messages=[
            {"role": "user", "content": "look them up"},
            tool_use({"who": [{"email": EMAIL}], "limit": 2}),
            tool_result([{"type": "text", "text": f"card {CARD}"}]),
            {"role": "assistant", "content": "and the file?"},
            user(
                {
                    "type": "document",
                    "source": {
                        "type": "text",
                        "media_type": "text/plain",
                        "data": "IBAN GB82 WEST 1234 5698 7654 32",
                    },
                    "title": f"statement for {EMAIL}",
                },
                {
                    "type": "document",
                    "source": {
                        "type": "content",
                        "content": [{"type": "text", "text": f"aws_secret_access_key={AWS}"}],
                    },
                },
                {"type": "text", "text": "summarise"},
            ),
        ],
    )
    assert raw.headers["x-tollway-redacted"] == "card=2,email=3,iban=1,phone=1,secret=1"
    sent = (await emulator.last())["body"]
    assert sent["system"][0]["text"] == "Escalate to [EMAIL]"
    assert sent["tools"][0]["description"] == "pays [CARD]"
    assert (
        sent["tools"][0]["input_schema"]["properties"]["q"]["description"]
        == "a phone such as [PHONE]"
    )
    assert sent["messages"][1]["content"][0]["input"] == {"who": [{"email": "[EMAIL]"}], "limit": 2}
    assert sent["messages"][2]["content"][0]["content"][0]["text"] == "card [CARD]"
    text_doc, content_doc = sent["messages"][4]["content"][:2]
    assert (
        text_doc["source"]["data"] == "IBAN [IBAN]" and text_doc["title"] == "statement for [EMAIL]"
    )
    assert content_doc["source"]["content"][0]["text"] == "aws_secret_access_key=[SECRET]"


async def test_responses_fields(make_gateway: Any, emulator: Emulator) -> None:
    """/v1/responses: the same texts are redacted whether the request passes through to an
    OpenAI provider or is translated for a Claude model (privacy runs before either)."""
    gw: Gw = await make_gateway(privacy_chain())
    client = gw.openai(await gw.create_key())
    arguments = json.dumps({"to": wide(EMAIL), "note": f"call\n{PHONE}", "n": 3})
    items: Any = [
        {"role": "developer", "content": f"Escalate to {EMAIL}"},
        {"role": "user", "content": [{"type": "input_text", "text": f"card {CARD}"}]},
        {"type": "function_call", "call_id": "call_1", "name": "send", "arguments": arguments},
        {
            "type": "function_call_output",
            "call_id": "call_1",
            "output": [{"type": "input_text", "text": f"aws_secret_access_key={AWS}"}],
        },
        {"role": "user", "content": "thanks"},
    ]
    tools: Any = [
        {"type": "function", "name": "send", "description": f"mails {EMAIL}", "parameters": {}}
    ]
    for model, path in (("gpt-5.4-mini", "/v1/responses"), ("claude-sonnet", "/v1/messages")):
        raw = await client.responses.with_raw_response.create(
            model=model, input=items, instructions=f"Reply to {EMAIL}", tools=tools
        )
        assert raw.headers["x-tollway-redacted"] == "card=1,email=4,phone=1,secret=1", model
        last = await emulator.last()
        assert last["path"] == path
        sent = last["body"]
        seen = json.dumps(sent, ensure_ascii=False)
        for value in (EMAIL, wide(EMAIL), CARD, PHONE, AWS):
            assert value not in seen, (model, value)
        if path == "/v1/responses":
            assert sent["instructions"] == "Reply to [EMAIL]"
            assert sent["input"][0]["content"] == "Escalate to [EMAIL]"
            assert sent["input"][1]["content"][0]["text"] == "card [CARD]"
            assert json.loads(sent["input"][2]["arguments"]) == {
                "to": "[EMAIL]",
                "note": "call\n[PHONE]",
                "n": 3,
            }
            assert sent["input"][3]["output"][0]["text"] == "aws_secret_access_key=[SECRET]"
            assert sent["tools"][0]["description"] == "mails [EMAIL]"
        else:
            assert "Reply to [EMAIL]" in json.dumps(sent["system"])
            tool_use = sent["messages"][1]["content"][0]
            assert tool_use["input"] == {"to": "[EMAIL]", "note": "call\n[PHONE]", "n": 3}
            assert "aws_secret_access_key=[SECRET]" in json.dumps(sent["messages"][2])
            assert sent["tools"][0]["description"] == "mails [EMAIL]"


async def test_signed_thinking_reaches_the_provider_unchanged(
    make_gateway: Any, emulator: Emulator
) -> None:
    """The provider verifies a thinking block's signature: an edited block fails the request,
    so thinking and redacted_thinking blocks pass as they are (the text beside them does not)."""
    gw: Gw = await make_gateway(privacy_chain())
    client = gw.anthropic(await gw.create_key())
    thinking = {
        "type": "thinking",
        "thinking": f"The user is {EMAIL}, card {CARD}.",
        "signature": "EqQBCkYIBxgCKkB" + "a" * 40,
    }
    hidden = {"type": "redacted_thinking", "data": f"EmwKAhgB{AWS}"}
    raw = await client.messages.with_raw_response.create(
        model="claude-sonnet",
        max_tokens=20,
        messages=[
            {"role": "user", "content": f"I am {EMAIL}"},
            {
                "role": "assistant",
                "content": [thinking, hidden, {"type": "text", "text": f"Hello {EMAIL}"}],
            },
            {"role": "user", "content": "go on"},
        ],
    )
    assert raw.headers["x-tollway-redacted"] == "email=2"  # the texts around the blocks
    sent = (await emulator.last())["body"]["messages"]
    assert sent[0]["content"] == "I am [EMAIL]"
    assert sent[1]["content"] == [thinking, hidden, {"type": "text", "text": "Hello [EMAIL]"}]


# ---- the new detector forms, and what they leave alone -------------------------------------


def redact(text: str) -> tuple[str, dict[str, int]]:
    counts: dict[str, int] = {}
    return Redactor(list(ALL_KINDS), [], "[{KIND}]").redact(text, counts), counts


@pytest.mark.parametrize(("kind", "value"), PII)
def test_every_form_is_found(kind: str, value: str) -> None:
    out, counts = redact(f"ref: {value}, ok")
    assert counts == {kind: 1}, (value, out)
    assert out.endswith(f"[{kind.upper()}], ok")


@pytest.mark.parametrize(
    "text",
    [
        "commit 3f2a9c1e5b7d8f0a2c4e6b8d0f1a3c5e7b9d2f4a fixed it",  # a git SHA-1
        "aws_secret: 3F2A9C1E5B7D8F0A2C4E6B8D0F1A3C5E7B9D2F4A",  # hex, even after "secret"
        "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU= integrity",  # base64, 44 chars
        "token Zk3h9Qw+Lm2Pz8Rt5Vb7Xn1Cd4Fg6Hj0Kl/Ma9S here",  # 39 characters
        "token Zk3h9Qw+Lm2Pz8Rt5Vb7Xn1Cd4Fg6Hj0Kl/Ma9SpQ here",  # 41 characters
        "token Zk3h9Qw+Lm2Pz8Rt5Vb7Xn1Cd4Fg6Hj0Kl/Ma9Sp_x here",  # part of a longer token
        "see /Users/JohnSmith/Projects/App2/src/mainX for it",  # a path
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghij0123",  # an alphabet, few class changes
        "released 2024/01/15, 2024.01.15 and v1.22.333.4444",
        "order 1234.5678.9012.3456 failed the Luhn check",
        "the ratio 1/2/3/4 and 100  200  300",
        wide("Full-width text with nothing"),
    ],
)
def test_lookalikes_are_left_alone(text: str) -> None:
    assert redact(text) == (text, {})


def test_the_text_goes_as_written_unless_normalising_reveals_something() -> None:
    plain = wide("Hello") + "\u200b " + wide("world") + " \u2116" + "5 \ufb01ne"
    out, counts = redact(plain)
    assert out is plain and counts == {}
    out, counts = redact(wide("Hello") + f", write to {wide(EMAIL)} or {EMAIL}")
    assert out == "Hello, write to [EMAIL] or [EMAIL]" and counts == {"email": 2}
    # found as written: replaced in place, the rest as written
    out, counts = redact(wide("Hello") + f" {EMAIL}")
    assert out == wide("Hello") + " [EMAIL]" and counts == {"email": 1}
    assert redact("our host is 10.0.0.1.")[0] == "our host is [IP]."


@settings(max_examples=400, deadline=None)
@given(
    st.text(
        alphabet="0123456789 ./+-@abcxyzKLMAZ_=\n\u200b\u00ad\uff10\uff11\uff14\uff20\u0661",
        min_size=1,
        max_size=60,
    )
)
def test_the_gate_never_hides_a_match(text: str) -> None:
    """Whatever the detectors find, as written or normalised, the RE2 gate lets through."""
    r = Redactor(list(ALL_KINDS), [], "[{KIND}]")
    counts: dict[str, int] = {}
    r.redact(text, counts, builtin=True)
    if counts:
        assert r.may_match(text), (text, counts)
