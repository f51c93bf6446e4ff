"""The texts of a Responses request: what privacy redacts and routing scores on /v1/responses.

``proxy.texts`` walks every string a provider's model reads; these tests pin each kind of
Responses input item (messages, earlier calls, tool outputs, hosted tool calls), the fields
it must leave alone (encrypted reasoning, images, ids, an MCP tool's credentials), and that
the privacy redactor rewrites the arguments of an earlier call as JSON.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from plugins.privacy import ALL_KINDS, Redactor
from plugins.routing import AutoConfig, Scorer, prompt_texts
from proxy.texts import text_slots

PNG = "data:image/png;base64,iVBORw0KGgo="


def found(body: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(texts, JSON texts) the walker finds."""
    json_texts: list[Any] = []
    slots = text_slots(body, json_texts)
    return [c[k] for c, k in slots], [c[k] for c, k in json_texts]


def responses(*items: Any, **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-5.4-mini", "input": list(items), **fields}


# (name, body, the text that must be found, whether it is JSON text)
FIELDS: list[tuple[str, dict[str, Any], str, bool]] = [
    ("string input", {"model": "m", "input": "VALUE"}, "VALUE", False),
    ("instructions", responses(instructions="VALUE"), "VALUE", False),
    ("short message", responses({"role": "user", "content": "VALUE"}), "VALUE", False),
    (
        "input_text part",
        responses(
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "VALUE"}],
            }
        ),
        "VALUE",
        False,
    ),
    (
        "developer message",
        responses({"role": "developer", "content": [{"type": "input_text", "text": "VALUE"}]}),
        "VALUE",
        False,
    ),
    (
        "output_text of an earlier turn",
        responses(
            {
                "type": "message",
                "id": "msg_1",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": "VALUE", "annotations": []}],
            }
        ),
        "VALUE",
        False,
    ),
    (
        "refusal of an earlier turn",
        responses(
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "refusal", "refusal": "VALUE"}],
            }
        ),
        "VALUE",
        False,
    ),
    (
        "function_call arguments",
        responses(
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": '{"q": "VALUE"}'}
        ),
        '{"q": "VALUE"}',
        True,
    ),
    (
        "function_call_output string",
        responses({"type": "function_call_output", "call_id": "c", "output": "VALUE"}),
        "VALUE",
        False,
    ),
    (
        "function_call_output parts",
        responses(
            {
                "type": "function_call_output",
                "call_id": "c",
                "output": [
                    {"type": "input_text", "text": "VALUE"},
                    {"type": "input_image", "image_url": PNG},
                ],
            }
        ),
        "VALUE",
        False,
    ),
    (
        "custom_tool_call input",
        responses({"type": "custom_tool_call", "call_id": "c", "name": "g", "input": "VALUE"}),
        "VALUE",
        False,
    ),
    (
        "custom_tool_call_output",
        responses({"type": "custom_tool_call_output", "call_id": "c", "output": "VALUE"}),
        "VALUE",
        False,
    ),
    (
        "mcp_call arguments",
        responses(
            {
                "type": "mcp_call",
                "id": "m",
                "name": "f",
                "server_label": "s",
                "arguments": '{"a": "VALUE"}',
            }
        ),
        '{"a": "VALUE"}',
        True,
    ),
    (
        "mcp_call output",
        responses(
            {
                "type": "mcp_call",
                "id": "m",
                "name": "f",
                "server_label": "s",
                "arguments": "{}",
                "output": "VALUE",
            }
        ),
        "VALUE",
        False,
    ),
    (
        "local_shell_call command",
        responses(
            {
                "type": "local_shell_call",
                "id": "l",
                "call_id": "c",
                "status": "completed",
                "action": {"type": "exec", "command": ["echo", "VALUE"], "env": {}},
            }
        ),
        "VALUE",
        False,
    ),
    (
        "local_shell_call_output",
        responses({"type": "local_shell_call_output", "id": "c", "output": "VALUE"}),
        "VALUE",
        False,
    ),
    (
        "shell_call_output stdout",
        responses(
            {
                "type": "shell_call_output",
                "call_id": "c",
                "output": [
                    {"stdout": "VALUE", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}}
                ],
            }
        ),
        "VALUE",
        False,
    ),
    (
        "apply_patch_call diff",
        responses(
            {
                "type": "apply_patch_call",
                "call_id": "c",
                "status": "completed",
                "operation": {"type": "update_file", "path": "a.py", "diff": "VALUE"},
            }
        ),
        "VALUE",
        False,
    ),
    (
        "code_interpreter_call code",
        responses(
            {
                "type": "code_interpreter_call",
                "id": "ci",
                "code": "VALUE",
                "container_id": "x",
                "status": "completed",
                "outputs": [],
            }
        ),
        "VALUE",
        False,
    ),
    (
        "code_interpreter_call logs",
        responses(
            {
                "type": "code_interpreter_call",
                "id": "ci",
                "code": "",
                "container_id": "x",
                "status": "completed",
                "outputs": [{"type": "logs", "logs": "VALUE"}],
            }
        ),
        "VALUE",
        False,
    ),
    (
        "file_search_call results",
        responses(
            {
                "type": "file_search_call",
                "id": "fs",
                "queries": ["q"],
                "status": "completed",
                "results": [{"text": "VALUE", "file_id": "f"}],
            }
        ),
        "VALUE",
        False,
    ),
    (
        "web_search_call query",
        responses(
            {
                "type": "web_search_call",
                "id": "ws",
                "status": "completed",
                "action": {"type": "search", "query": "VALUE"},
            }
        ),
        "VALUE",
        False,
    ),
    (
        "text.format schema",
        responses(
            text={
                "format": {
                    "type": "json_schema",
                    "name": "a",
                    "description": "VALUE",
                    "schema": {"type": "object"},
                }
            }
        ),
        "VALUE",
        False,
    ),
    (
        "flat function tool",
        responses(
            tools=[
                {
                    "type": "function",
                    "name": "f",
                    "description": "VALUE",
                    "parameters": {"type": "object"},
                }
            ]
        ),
        "VALUE",
        False,
    ),
    (
        "mcp tool description",
        responses(
            tools=[
                {
                    "type": "mcp",
                    "server_label": "s",
                    "server_url": "https://mcp.test",
                    "server_description": "VALUE",
                }
            ]
        ),
        "VALUE",
        False,
    ),
    (
        "prompt variables",
        {"model": "m", "prompt": {"id": "pmpt_1", "variables": {"city": "VALUE"}}},
        "VALUE",
        False,
    ),
    ("safety_identifier", responses(safety_identifier="VALUE"), "VALUE", False),
    ("metadata", responses(metadata={"k": "VALUE"}), "VALUE", False),
]


@pytest.mark.parametrize(("name", "body", "text", "is_json"), FIELDS, ids=[f[0] for f in FIELDS])
def test_every_responses_field_is_walked(
    name: str, body: dict[str, Any], text: str, is_json: bool
) -> None:
    texts, json_texts = found(body)
    assert text in (json_texts if is_json else texts), (name, texts, json_texts)
    if is_json:
        assert text not in texts  # privacy decodes JSON text before it redacts


def test_what_the_model_does_not_read_is_left_alone() -> None:
    body = responses(
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [{"type": "summary_text", "text": "SUMMARY"}],
            "encrypted_content": "ENCRYPTED",
        },
        {"type": "compaction", "id": "cmp_1", "encrypted_content": "COMPACTED"},
        {
            "role": "user",
            "content": [
                {"type": "input_image", "image_url": PNG, "detail": "auto"},
                {"type": "input_file", "file_data": PNG, "filename": "FILENAME"},
            ],
        },
        {"type": "item_reference", "id": "msg_REF"},
        {"type": "image_generation_call", "id": "ig", "status": "completed", "result": "BASE64"},
        tools=[
            {
                "type": "mcp",
                "server_label": "s",
                "server_url": "https://mcp.test/SERVER",
                "authorization": "sk-proj-TOKENTOKENTOKENTOKEN",
                "headers": {"Authorization": "Bearer HEADERHEADERHEADERHEADER"},
            }
        ],
    )
    texts, json_texts = found(body)
    joined = "\n".join(texts + json_texts)
    for hidden in (
        "SUMMARY",
        "ENCRYPTED",
        "COMPACTED",
        PNG,
        "FILENAME",
        "REF",
        "BASE64",
        "SERVER",
        "TOKEN",
        "HEADER",
    ):
        assert hidden not in joined, hidden


def test_odd_item_shapes_are_walked_not_crashed_on() -> None:
    body = responses(
        "a bare string",
        {"type": ["x"], "content": "VALUE1"},
        {"type": None, "role": "user", "content": "VALUE2"},
        {"type": "function_call_output", "output": 7},
        {"type": "shell_call_output", "output": "not a list"},
        {"type": "web_search_call", "action": None},
        7,
        prompt="not a template",
    )
    texts, _ = found(body)
    assert {"VALUE1", "VALUE2", "a bare string"} <= set(texts)


def test_the_redactor_edits_each_kind_in_place() -> None:
    """What privacy's access hook does with the slots: redacted in place, JSON kept JSON."""
    email = "jane.roe@example.org"
    body = responses(
        {"role": "user", "content": f"I am {email}"},
        {
            "type": "function_call",
            "call_id": "c",
            "name": "send",
            "arguments": json.dumps({"to": email}),
        },
        {
            "type": "function_call_output",
            "call_id": "c",
            "output": [{"type": "input_text", "text": f"sent to {email}"}],
        },
        instructions=f"Reply to {email}",
    )
    redactor = Redactor(list(ALL_KINDS), [], "[{KIND}]")
    json_texts: list[Any] = []
    slots = text_slots(body, json_texts)
    counts: dict[str, int] = {}
    for container, key in slots:
        container[key] = redactor.redact(container[key], counts)
    for container, key in json_texts:
        value = json.loads(container[key])
        value["to"] = redactor.redact(value["to"], counts)
        container[key] = json.dumps(value)
    assert counts == {"email": 4}
    assert body["input"][0]["content"] == "I am [EMAIL]"
    assert json.loads(body["input"][1]["arguments"]) == {"to": "[EMAIL]"}
    assert body["input"][2]["output"][0]["text"] == "sent to [EMAIL]"
    assert body["instructions"] == "Reply to [EMAIL]"


# --- routing's complexity score ----------------------------------------------------------------


def test_routing_reads_a_responses_request() -> None:
    body = responses(
        {"role": "developer", "content": "reason carefully"},
        {"role": "user", "content": [{"type": "input_text", "text": "Prove it step by step"}]},
        {"type": "function_call_output", "call_id": "c", "output": "tool said this"},
        instructions="Be brief.",
    )
    texts, user = prompt_texts(body)
    assert texts == ["Be brief.", "reason carefully", "Prove it step by step", "tool said this"]
    assert user == ["Prove it step by step"]
    assert prompt_texts({"model": "m", "input": "hello"}) == (["hello"], ["hello"])
    s = Scorer(AutoConfig(cheap="a", strong="b"))
    assert s.score({"input": "hi"}) == (0, [])
    assert s.score(body) == (1, ["reasoning"])
    schema = {"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}}}
    assert s.score({"input": "hi", "text": schema}) == (1, ["tools"])
    assert s.score({"input": "hi", "max_output_tokens": 4000}) == (1, ["output"])
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 3
    assert s.score({"input": turns}) == (1, ["turns"])
