"""The texts of a request as a provider would read them, for plugins that look at the prompt.

One walker for every body shape the gateway accepts (OpenAI chat, completions and Responses,
Anthropic messages, embeddings), so privacy redacts and routing scores exactly the same texts.
It finds every string the provider's model reads or the provider stores:

- message contents (strings, text and refusal parts, an assistant's ``refusal``), system
  prompts (both shapes), ``instructions``, completion ``prompt`` and ``suffix``, embeddings
  ``input``, ``prediction`` contents;
- Responses ``input``: a string, or items: messages (``input_text`` / ``output_text`` /
  ``refusal`` parts), earlier turns' ``function_call.arguments``, tool outputs
  (``function_call_output.output``, a string or parts), custom and MCP calls and results,
  hosted tool calls' commands, queries, code, logs and patches (see ``_ITEMS``); a prompt
  template's ``variables``; ``text.format``'s JSON schema;
- earlier tool calls: ``tool_calls[].function.arguments``, the legacy
  ``function_call.arguments``, Anthropic ``tool_use`` / ``server_tool_use`` ``input`` (every
  string value, at any depth) and ``tool_result`` contents (a string or blocks, nested);
- documents: text sources (``source.type: text``), content sources, ``title`` and ``context``;
  search results; citations' ``cited_text``;
- tool and schema texts: ``tools`` and legacy ``functions`` (descriptions, and every string
  of a parameters / ``input_schema`` schema but its identifiers: ``type``, ``name``,
  ``format``, ``required``, ``$ref``...), ``response_format`` (its JSON schema likewise);
- ``user``, ``safety_identifier`` and ``metadata`` (the provider stores them: applications
  put emails there).

Not visited, on purpose: signed ``thinking`` and ``redacted_thinking`` blocks (the provider
checks their signature, so an edited block fails the request; they are the provider's own
output coming back), Responses ``reasoning`` and ``compaction`` items likewise (encrypted
content), binary sources (base64 images, PDFs, audio), URLs of images and files, object keys,
model and tool names, ``stop`` sequences, and an MCP tool's ``authorization``, ``headers`` and
server address (they reach the MCP server, not the model: a placeholder would break the tool).

The walk collects *slots*, ``(container, key)`` pairs whose ``container[key]`` is a string,
so a plugin reads every text once and writes back only those it changed. Tool-call arguments
are JSON text; a caller that edits inside them can have them apart (``text_slots(body,
json_texts)``) and decode them first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Slot = tuple[Any, Any]
"""``(container, key)``: a dict and its key, or a list and its index, holding one text."""

_Add = Callable[[Slot], None]

SIGNED_BLOCKS = frozenset({"thinking", "redacted_thinking"})
"""Blocks the provider verifies by signature: never edited, so never visited."""

# Schema and tool keys whose string values are identifiers the provider matches, not prose:
# editing them would break the request (a renamed tool, a ``required`` entry that no longer
# names a property) and none of them holds anything a detector looks for.
_IDENTIFIERS = frozenset(
    {
        "type",
        "name",
        "format",
        "required",
        "strict",
        "$ref",
        "$id",
        "$schema",
        "$anchor",
        "$dynamicRef",
        "$dynamicAnchor",
        "cache_control",
    }
)
# Schema keywords whose values are data (any strings, any keys), not schemas
_SCHEMA_DATA = frozenset({"default", "examples", "example", "const", "enum"})


def _str(container: Any, key: Any, value: Any, add: _Add) -> None:
    if isinstance(value, str):
        add((container, key))


def _data(container: Any, key: Any, value: Any, add: _Add) -> None:
    """Every string value of a JSON value, at any depth (tool inputs, metadata)."""
    t = type(value)
    if t is str:
        add((container, key))
    elif t is dict:
        for k, v in value.items():
            if type(v) is str:
                add((value, k))
            else:
                _data(value, k, v, add)
    elif t is list:
        for i, v in enumerate(value):
            if type(v) is str:
                add((value, i))
            else:
                _data(value, i, v, add)


def _schema(container: Any, key: Any, value: Any, add: _Add) -> None:
    """A tool definition or a JSON schema: its strings but the identifiers'. Strings are
    handled in the loops rather than by a call each: tools are the largest part of many
    requests, walked on every one."""
    t = type(value)
    if t is dict:
        for k, v in value.items():
            t = type(v)
            if t is str:
                if k not in _IDENTIFIERS:
                    add((value, k))
            elif k in _SCHEMA_DATA:
                _data(value, k, v, add)
            elif t is dict or (t is list and k not in _IDENTIFIERS):  # a property may be "type"
                _schema(value, k, v, add)
    elif t is list:
        for i, v in enumerate(value):
            if type(v) is str:
                add((value, i))
            else:
                _schema(value, i, v, add)
    elif t is str:
        add((container, key))


# Fields of a Responses ``mcp`` tool that reach the MCP server, not the model: a token there
# is given on purpose, and a placeholder would only break the tool
_TOOL_CREDENTIALS = frozenset({"authorization", "headers", "server_url", "connector_id"})


def _schemas(container: Any, key: Any, value: Any, add: _Add) -> None:
    if type(value) is list:
        for i, v in enumerate(value):
            if type(v) is dict:
                if v.get("type") == "mcp":
                    for k, x in v.items():
                        if k not in _TOOL_CREDENTIALS and k not in _IDENTIFIERS:
                            _schema(v, k, x, add)
                else:
                    _schema(value, i, v, add)


def _text_config(container: Any, key: Any, value: Any, add: _Add) -> None:
    """A Responses ``text``: its ``format``'s JSON schema and description."""
    if isinstance(value, dict):
        fmt = value.get("format")
        if isinstance(fmt, dict):
            _schema(value, "format", fmt, add)


def _content(container: Any, key: Any, value: Any, add: _Add) -> None:
    """A message content: a string, a list of blocks (or parts), or one block."""
    if isinstance(value, str):
        add((container, key))
    elif isinstance(value, list):
        for block in value:
            if isinstance(block, dict):
                _block(block, add)
    elif isinstance(value, dict):
        _block(value, add)


def _source(container: Any, key: Any, value: Any, add: _Add) -> None:
    """A document's source: plain text or content blocks are read; base64 and URLs are not."""
    if isinstance(value, dict):
        kind = value.get("type")
        if kind == "text":
            _str(value, "data", value.get("data"), add)
        elif kind == "content":
            _content(value, "content", value.get("content"), add)


def _citations(container: Any, key: Any, value: Any, add: _Add) -> None:
    if isinstance(value, list):
        for c in value:
            if isinstance(c, dict):
                _str(c, "cited_text", c.get("cited_text"), add)
                _str(c, "document_title", c.get("document_title"), add)


_Visit = Callable[[Any, Any, Any, _Add], None]

_BLOCK: dict[str, _Visit] = {
    "text": _str,
    "refusal": _str,
    "content": _content,  # tool_result, search_result, mcp_tool_result
    "input": _data,  # tool_use, server_tool_use, mcp_tool_use
    "source": _source,  # document
    "title": _str,
    "context": _str,
    "citations": _citations,
}


def _block(block: dict[str, Any], add: _Add) -> None:
    kind = block.get("type")
    if kind == "text":  # most blocks: their text, and what a citation quotes
        _str(block, "text", block.get("text"), add)
        if "citations" in block:
            _citations(block, "citations", block["citations"], add)
        return
    if isinstance(kind, str) and kind in SIGNED_BLOCKS:  # a "type" may be anything a client sent
        return
    for k, v in block.items():
        visit = _BLOCK.get(k)
        if visit is not None:
            visit(block, k, v, add)


def _arguments(value: Any, add_json: _Add) -> None:
    """A legacy ``function_call``, or the ``function`` of a tool call: its arguments, JSON
    text (a JSON-text slot: see ``text_slots``)."""
    if isinstance(value, dict):
        _str(value, "arguments", value.get("arguments"), add_json)


def _tool_calls(value: Any, add: _Add, add_json: _Add) -> None:
    """An assistant's earlier calls: function arguments, or a custom tool's free-text input."""
    if isinstance(value, list):
        for call in value:
            if isinstance(call, dict):
                _arguments(call.get("function"), add_json)
                custom = call.get("custom")
                if isinstance(custom, dict):
                    _str(custom, "input", custom.get("input"), add)


def _message(message: dict[str, Any], add: _Add, add_json: _Add) -> None:
    content = message.get("content")
    if content is not None:
        _content(message, "content", content, add)
    # most messages are a role and a content, nothing else
    if len(message) != 2 or content is None or "role" not in message:
        _str(message, "refusal", message.get("refusal"), add)
        calls = message.get("tool_calls")
        if calls is not None:
            _tool_calls(calls, add, add_json)
        _arguments(message.get("function_call"), add_json)


def _messages(container: Any, key: Any, value: Any, add: _Add, add_json: _Add) -> None:
    if isinstance(value, list):
        for m in value:
            if isinstance(m, dict):
                _message(m, add, add_json)


def _output(item: dict[str, Any], add: _Add, add_json: _Add) -> None:
    """A tool's output fed back: a string, or text, image and file parts."""
    _content(item, "output", item.get("output"), add)


def _each(value: Any, key: str, add: _Add) -> None:
    """``key`` of every object of a list (shell outputs' ``stdout``, search results' text)."""
    if isinstance(value, list):
        for v in value:
            if isinstance(v, dict):
                _str(v, key, v.get(key), add)


def _action(item: dict[str, Any], keys: tuple[str, ...], add: _Add) -> None:
    """The texts of a hosted tool call's ``action`` (a command, a query, typed text)."""
    action = item.get("action")
    if isinstance(action, dict):
        for k in keys:
            if k in action:
                _data(action, k, action[k], add)


_Item = Callable[[dict[str, Any], _Add, _Add], None]


def _fields(*keys: str) -> _Item:
    """An item whose ``keys`` hold plain text: a string, strings or an object of them."""

    def visit(item: dict[str, Any], add: _Add, add_json: _Add) -> None:
        for k in keys:
            if k in item:
                _data(item, k, item[k], add)

    return visit


def _call(item: dict[str, Any], add: _Add, add_json: _Add) -> None:
    """A function or MCP call: its arguments are JSON text; an MCP call's result is text."""
    _str(item, "arguments", item.get("arguments"), add_json)
    _str(item, "output", item.get("output"), add)
    _str(item, "error", item.get("error"), add)


def _shell_output(item: dict[str, Any], add: _Add, add_json: _Add) -> None:
    _each(item.get("output"), "stdout", add)
    _each(item.get("output"), "stderr", add)


def _patch(item: dict[str, Any], add: _Add, add_json: _Add) -> None:
    op = item.get("operation")
    if isinstance(op, dict):
        _str(op, "diff", op.get("diff"), add)


def _code(item: dict[str, Any], add: _Add, add_json: _Add) -> None:
    _str(item, "code", item.get("code"), add)
    _each(item.get("outputs"), "logs", add)


def _file_search(item: dict[str, Any], add: _Add, add_json: _Add) -> None:
    if "queries" in item:
        _data(item, "queries", item["queries"], add)
    _each(item.get("results"), "text", add)


def _mcp_tools(item: dict[str, Any], add: _Add, add_json: _Add) -> None:
    _schemas(item, "tools", item.get("tools"), add)


def _acts(*keys: str) -> _Item:
    """A hosted tool call whose ``action`` holds text under ``keys`` (a command, a query)."""

    def visit(item: dict[str, Any], add: _Add, add_json: _Add) -> None:
        _action(item, keys, add)

    return visit


# Responses input items other than messages, by type: what the model reads of each. Not
# visited: ``reasoning`` and ``compaction`` items (encrypted content the provider verifies,
# beside summaries of its own), images, ids, names, URLs and statuses.
_ITEMS: dict[str, _Item] = {
    "function_call": _call,
    "function_call_output": _output,
    "custom_tool_call": _fields("input"),
    "custom_tool_call_output": _output,
    "mcp_call": _call,
    "mcp_approval_request": _call,
    "mcp_list_tools": _mcp_tools,
    "local_shell_call": _acts("command", "env"),
    "local_shell_call_output": _fields("output"),
    "shell_call": _acts("commands"),
    "shell_call_output": _shell_output,
    "apply_patch_call": _patch,
    "apply_patch_call_output": _fields("output"),
    "code_interpreter_call": _code,
    "file_search_call": _file_search,
    "web_search_call": _acts("query", "queries"),
    "computer_call": _acts("text"),
}


def _prompts(container: Any, key: Any, value: Any, add: _Add, add_json: _Add) -> None:
    """A prompt or an embeddings input: a string or a batch of them (token ids are not text);
    a Responses ``input``: a string or items, messages and earlier turns' calls and outputs
    (see ``_ITEMS``); a Responses ``prompt`` template's variables."""
    if isinstance(value, str):
        add((container, key))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if isinstance(v, str):
                add((value, i))
            elif isinstance(v, dict):
                kind = v.get("type")
                if kind is None or kind == "message" or not isinstance(kind, str):
                    _message(v, add, add_json)  # a "type" may be anything a client sent
                else:
                    visit = _ITEMS.get(kind)
                    if visit is not None:
                        visit(v, add, add_json)
    elif isinstance(value, dict):
        variables = value.get("variables")
        if isinstance(variables, dict):
            for k, v in variables.items():
                _content(variables, k, v, add)


def _prediction(container: Any, key: Any, value: Any, add: _Add) -> None:
    if isinstance(value, dict):
        _content(value, "content", value.get("content"), add)


_Visit2 = Callable[[Any, Any, Any, _Add, _Add], None]


def _texts(visit: _Visit) -> _Visit2:
    """A field without tool calls: its visitor without the JSON-text collector."""
    return lambda container, key, value, add, add_json: visit(container, key, value, add)


_BODY: dict[str, _Visit2] = {
    "messages": _messages,
    "prompt": _prompts,
    "input": _prompts,
    "system": _texts(_content),
    "instructions": _texts(_content),
    "suffix": _texts(_str),
    "prediction": _texts(_prediction),
    "tools": _texts(_schemas),
    "functions": _texts(_schemas),
    "response_format": _texts(_schema),
    "text": _texts(_text_config),
    "user": _texts(_str),
    "safety_identifier": _texts(_str),
    "metadata": _texts(_data),
}


def text_slots(body: dict[str, Any], json_texts: list[Slot] | None = None) -> list[Slot]:
    """Every text of a chat, messages, completions or embeddings request, as slots.

    Tool-call arguments are JSON text: with ``json_texts`` given they go there instead, for a
    caller that edits inside them (a text edit could break a JSON escape such as ``\\n``)."""
    slots: list[Slot] = []
    add = slots.append
    add_json = add if json_texts is None else json_texts.append
    for k, v in body.items():
        visit = _BODY.get(k)
        if visit is not None:
            visit(body, k, v, add, add_json)
    return slots


def data_slots(value: Any) -> tuple[list[Any], list[Slot]]:
    """The string slots of a decoded JSON value at any depth, and the one-item list holding
    the value (the container of the first slot when the value itself is a string)."""
    holder = [value]
    slots: list[Slot] = []
    _data(holder, 0, value, slots.append)
    return holder, slots


def visit_texts(body: dict[str, Any], fn: Callable[[str], str | None]) -> None:
    """Call ``fn`` on every text of a request, replacing a text where ``fn`` returns a
    string (None leaves it)."""
    for container, key in text_slots(body):
        out = fn(container[key])
        if out is not None:
            container[key] = out


def texts_of(content: Any) -> list[str]:
    """The texts of one message content (a string, or the texts of its blocks)."""
    slots: list[Slot] = []
    _content(None, None, content, slots.append)
    return [content if c is None else c[k] for c, k in slots]
