"""What becomes of every request field when a client's dialect is not its model's provider's.

An OpenAI client may call a Claude model and an Anthropic client an OpenAI model. A field the
other provider has no name for must not vanish on the way: the client asked for something
(a schema, several choices, log probabilities) and would get a different answer without
knowing. So each field of each direction has one decision, declared here once:

- ``translated``: sent under the provider's own name and shape (``stop`` -> ``stop_sequences``);
- ``emulated``: the gateway does it itself (``n`` > 1 to Claude: n calls, one reply);
- ``refused``: a 400 naming the field (``param``), because the provider cannot honour it and
  the answer would differ; the field's values that ask for nothing (``harmless``: its
  default, ``null``) pass and are not sent;
- ``ignored``: not sent, and documented so, only where it has no effect on the answer
  (storage, prompt-cache and latency hints).

A field the table does not know is refused too: it cannot be translated. The request
translators (``request``) check a body against its table before mapping it; the table is
rendered into ``docs/translation.md`` (``docs/generate.py``), and ``tests/proxy/
test_translate_fields.py`` sends every row's example through a gateway and checks what the
provider received (``sent``) or the refusal. Same-dialect requests never come here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Decision = Literal["translated", "emulated", "refused", "ignored"]
Direction = Literal["openai->anthropic", "anthropic->openai"]


class Unsupported(Exception):
    """A field the serving provider cannot honour: the handler answers 400 naming ``param``."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}")
        self.param = param
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Field:
    """One request field of one direction: its decision, and an example that shows it.

    ``how`` says what happens (the docs' text and, for a refusal, the error's reason).
    ``example`` is a value a client sends (with the fields in ``needs``, which it only makes
    sense with); ``sent`` is what the provider then receives (keys of its body; ``{}``:
    nothing). ``refused`` is a set of fields, this one among them, that a translated or
    emulated field refuses (an unsupported variant).
    """

    name: str
    decision: Decision
    how: str
    example: Any
    sent: Mapping[str, Any] = field(default_factory=dict)
    harmless: tuple[Any, ...] = ()
    needs: Mapping[str, Any] = field(default_factory=dict)
    refused: Mapping[str, Any] | None = None


def check(body: Mapping[str, Any], table: Mapping[str, Field]) -> None:
    """Raise ``Unsupported`` for the first field of ``body`` that is unknown or refused.

    A refused field with ``null`` or a harmless value asks for nothing and passes (the
    translator does not send it). One dict lookup per field: it runs on every translated
    request.
    """
    for key, value in body.items():
        spec = table.get(key)
        if spec is None:
            raise Unsupported(key, "it is not a parameter of this API, so it cannot be translated")
        if spec.decision == "refused" and value is not None and value not in spec.harmless:
            raise Unsupported(key, spec.how)


# --- shared examples ---------------------------------------------------------------------------

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {"location": {"type": "string"}},
    "required": ["location"],
}
_OPENAI_TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": _PARAMS},
    }
]
_ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Weather", "input_schema": _PARAMS}]
_PROMPT = "Say hi"


def _table(*fields: Field) -> dict[str, Field]:
    return {f.name: f for f in fields}


# --- OpenAI chat completions client -> Anthropic Messages provider ----------------------------

OPENAI_TO_ANTHROPIC: dict[str, Field] = _table(
    Field(
        "messages",
        "translated",
        "system and developer turns become `system`; user, assistant and tool turns become "
        "alternating turns (tool results as `tool_result` blocks, image URLs and base64 "
        "images and PDFs as blocks); a message's `name` is not carried (Anthropic turns have "
        "no participant names); audio input and files by id are refused",
        [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": _PROMPT}],
        {"system": "Be terse.", "messages": [{"role": "user", "content": _PROMPT}]},
        refused={
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "input_audio",
                            "input_audio": {"data": "UklGRg==", "format": "wav"},
                        }
                    ],
                }
            ]
        },
    ),
    Field(
        "model",
        "translated",
        "the model's `upstream_model` in the policy",
        "claude-sonnet",
        {"model": "claude-sonnet-5"},
    ),
    Field(
        "audio",
        "refused",
        "Claude answers in text only",
        {"voice": "alloy", "format": "wav"},
    ),
    Field(
        "frequency_penalty",
        "refused",
        "Claude has no frequency penalty; `0` asks for nothing",
        0.5,
        harmless=(0,),
    ),
    Field(
        "function_call",
        "refused",
        "deprecated function calling: send `tools` and `tool_choice`",
        {"name": "get_weather"},
    ),
    Field(
        "functions",
        "refused",
        "deprecated function calling: send `tools` and `tool_choice`",
        [{"name": "get_weather", "parameters": _PARAMS}],
        harmless=([],),
    ),
    Field(
        "logit_bias",
        "refused",
        "Claude takes no token biases; `{}` asks for nothing",
        {"50256": -100},
        harmless=({},),
    ),
    Field(
        "logprobs",
        "refused",
        "Claude returns no token log probabilities; `false` asks for nothing",
        True,
        harmless=(False,),
    ),
    Field(
        "max_completion_tokens",
        "translated",
        "`max_tokens` (it wins over `max_tokens`); with neither, the provider's "
        "`default_max_tokens`",
        50,
        {"max_tokens": 50},
    ),
    Field(
        "max_tokens",
        "translated",
        "`max_tokens`",
        40,
        {"max_tokens": 40},
    ),
    Field(
        "metadata",
        "ignored",
        "tags of OpenAI's stored completions",
        {"run": "nightly"},
    ),
    Field(
        "modalities",
        "refused",
        'Claude answers in text only; `["text"]` asks for nothing',
        ["text", "audio"],
        harmless=(["text"],),
    ),
    Field(
        "moderation",
        "refused",
        "Anthropic runs no configurable moderation of a request",
        {"model": "omni-moderation-latest"},
    ),
    Field(
        "n",
        "emulated",
        "more than 1: n provider calls at once, answered as one reply with n choices and the "
        "usage of all n calls added up (what is billed); with `stream` refused; `1` asks "
        "for nothing",
        2,
        {},
        refused={"n": 2, "stream": True},
    ),
    Field(
        "parallel_tool_calls",
        "translated",
        "`false`: `tool_choice.disable_parallel_tool_use: true` (when tools are offered)",
        False,
        {"tool_choice": {"type": "auto", "disable_parallel_tool_use": True}},
        needs={"tools": _OPENAI_TOOLS},
    ),
    Field(
        "prediction",
        "ignored",
        "a latency hint for text known in advance",
        {"type": "content", "content": "Hello"},
    ),
    Field(
        "presence_penalty",
        "refused",
        "Claude has no presence penalty; `0` asks for nothing",
        0.5,
        harmless=(0,),
    ),
    Field(
        "prompt_cache_key",
        "ignored",
        "an OpenAI prompt-cache routing hint",
        "tenant-7",
    ),
    Field(
        "prompt_cache_options",
        "ignored",
        "OpenAI prompt-cache breakpoints",
        {"mode": "implicit"},
    ),
    Field(
        "prompt_cache_retention",
        "ignored",
        "how long OpenAI keeps a cached prompt",
        "24h",
    ),
    Field(
        "reasoning_effort",
        "translated",
        "`thinking: {type: enabled, budget_tokens}`: minimal 1024, low 2048, medium 8192, "
        "high 16384, xhigh 32768, max 65536 tokens, at most `max_tokens` - 1 (the budget "
        "counts in `max_tokens`, as reasoning counts in `max_completion_tokens`); without a "
        "client limit `max_tokens` is `default_max_tokens` + the budget; `none`: `thinking: "
        "{type: disabled}`; a limit of 1024 tokens or less leaves no room to think: refused",
        "low",
        {"thinking": {"type": "enabled", "budget_tokens": 2048}, "max_tokens": 4096 + 2048},
        refused={"reasoning_effort": "high", "max_completion_tokens": 1000},
    ),
    Field(
        "response_format",
        "translated",
        "`json_schema`: `output_config.format: {type: json_schema, schema}` (Claude's "
        "structured outputs are always strict; `name` and `description` only label the "
        "schema); `json_object`: the same with the schema `{type: object}`; `text`: nothing",
        {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
        },
        {"output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}},
    ),
    Field(
        "safety_identifier",
        "translated",
        "`metadata.user_id` (it wins over `user`)",
        "user-hash-1",
        {"metadata": {"user_id": "user-hash-1"}},
    ),
    Field(
        "seed",
        "refused",
        "Claude has no seeded sampling: the answers would not repeat",
        7,
    ),
    Field(
        "service_tier",
        "translated",
        "`auto`, `priority`, `fast`, `scale`: `auto` (priority capacity when the account has "
        "it); `default`: `standard_only`; `flex` has no Anthropic equivalent: refused",
        "default",
        {"service_tier": "standard_only"},
        refused={"service_tier": "flex"},
    ),
    Field(
        "stop",
        "translated",
        "`stop_sequences` (a string becomes a list of one)",
        "END",
        {"stop_sequences": ["END"]},
    ),
    Field(
        "store",
        "ignored",
        "keeping the completion at OpenAI",
        True,
    ),
    Field(
        "stream",
        "translated",
        "`stream`; Anthropic's events are translated into `chat.completion.chunk`s",
        True,
        {"stream": True},
    ),
    Field(
        "stream_options",
        "translated",
        "`include_usage` is honoured by the gateway (the usage chunk is sent when asked "
        "for); `include_obfuscation` has nothing to pad",
        {"include_usage": True},
        {"stream": True},
        needs={"stream": True},
    ),
    Field(
        "temperature",
        "translated",
        "`temperature`; OpenAI's range is 0 to 2, Anthropic's 0 to 1: above 1 is sent as 1",
        1.5,
        {"temperature": 1.0},
    ),
    Field(
        "tool_choice",
        "translated",
        "`auto`: `auto`; `none`: `none`; `required`: `any`; a named function: `{type: tool, "
        "name}`; `allowed_tools`: only those tools are offered, `mode` as above (without "
        "tools there is nothing to choose)",
        {"type": "function", "function": {"name": "get_weather"}},
        {"tool_choice": {"type": "tool", "name": "get_weather"}},
        needs={"tools": _OPENAI_TOOLS},
    ),
    Field(
        "tools",
        "translated",
        "function tools: `{name, description, input_schema, strict}`; custom (free-form "
        "grammar) tools have no Anthropic equivalent: refused",
        _OPENAI_TOOLS,
        {"tools": _ANTHROPIC_TOOLS},
        refused={"tools": [{"type": "custom", "custom": {"name": "sql"}}]},
    ),
    Field(
        "top_logprobs",
        "refused",
        "Claude returns no token log probabilities",
        2,
    ),
    Field(
        "top_p",
        "translated",
        "`top_p`",
        0.9,
        {"top_p": 0.9},
    ),
    Field(
        "user",
        "translated",
        "`metadata.user_id`",
        "u-42",
        {"metadata": {"user_id": "u-42"}},
    ),
    Field(
        "verbosity",
        "refused",
        "Claude has no verbosity setting; `medium` (the default) asks for nothing",
        "low",
        harmless=("medium",),
    ),
    Field(
        "web_search_options",
        "translated",
        "Claude's web search tool `{type: web_search_20250305, name: web_search, "
        "user_location}`; a `search_context_size` other than `medium` has no equivalent: "
        "refused",
        {"user_location": {"type": "approximate", "approximate": {"city": "Paris"}}},
        {
            "tools": [
                {
                    "type": "web_search_20250305",
                    "name": "web_search",
                    "user_location": {"type": "approximate", "city": "Paris"},
                }
            ]
        },
        refused={"web_search_options": {"search_context_size": "high"}},
    ),
)


# --- Anthropic Messages client -> OpenAI chat completions provider ----------------------------

ANTHROPIC_TO_OPENAI: dict[str, Field] = _table(
    Field(
        "max_tokens",
        "translated",
        "`max_completion_tokens` (OpenAI's reasoning models refuse `max_tokens`)",
        50,
        {"max_completion_tokens": 50},
    ),
    Field(
        "messages",
        "translated",
        "turns in order: `tool_result` blocks become `tool` turns (their images follow in a "
        "user turn), `tool_use` blocks tool calls, images `image_url` parts, base64 PDFs "
        "`file` parts, text documents text; thinking and server-tool blocks of earlier "
        "assistant turns are not sent (OpenAI takes no reasoning or server-tool history); "
        "documents by URL or file id and other blocks are refused",
        [{"role": "user", "content": [{"type": "text", "text": _PROMPT}]}],
        {"messages": [{"role": "user", "content": _PROMPT}]},
        refused={
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "document",
                            "source": {"type": "url", "url": "https://example.com/a.pdf"},
                        }
                    ],
                }
            ]
        },
    ),
    Field(
        "model",
        "translated",
        "the model's `upstream_model` in the policy",
        "gpt-5.4-mini",
        {"model": "gpt-5.4-mini"},
    ),
    Field(
        "billing_policy",
        "refused",
        "an Anthropic account setting",
        {"type": "standard"},
    ),
    Field(
        "cache_control",
        "ignored",
        "OpenAI caches prompts by itself",
        {"type": "ephemeral"},
    ),
    Field(
        "compaction",
        "refused",
        "OpenAI does not compact a conversation",
        {"enabled": True},
    ),
    Field(
        "container",
        "refused",
        "OpenAI chat completions have no code-execution container",
        "container_011",
    ),
    Field(
        "context_management",
        "refused",
        "OpenAI does not edit the context (clear tool results or thinking)",
        {"edits": [{"type": "clear_tool_uses_20250919"}]},
    ),
    Field(
        "diagnostics",
        "ignored",
        "why Anthropic's prompt cache missed",
        {"previous_message_id": "msg_1"},
    ),
    Field(
        "fallback_credit_token",
        "refused",
        "an Anthropic account setting",
        "fct_1",
    ),
    Field(
        "fallbacks",
        "refused",
        "Anthropic's own model fallbacks (the gateway's are set in the policy)",
        [{"model": "claude-haiku-4-5"}],
    ),
    Field(
        "inference_geo",
        "refused",
        "OpenAI chat completions choose no region: the data could leave it",
        "us",
    ),
    Field(
        "mcp_servers",
        "refused",
        "OpenAI chat completions connect no MCP servers",
        [{"type": "url", "url": "https://mcp.example.com/sse", "name": "docs"}],
        harmless=([],),
    ),
    Field(
        "metadata",
        "translated",
        "`user_id`: `user`",
        {"user_id": "u-1"},
        {"user": "u-1"},
    ),
    Field(
        "output_config",
        "translated",
        "`format` (structured outputs): `response_format: {type: json_schema, json_schema: "
        "{name: output, schema, strict}}`, `strict` when OpenAI's strict mode takes the "
        "schema (every object closed, every property required); `effort`: "
        "`reasoning_effort` (the same names)",
        {"format": {"type": "json_schema", "schema": SCHEMA}},
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": SCHEMA, "strict": True},
            }
        },
    ),
    Field(
        "service_tier",
        "translated",
        "`auto`: `auto`; `standard_only`: `default`",
        "standard_only",
        {"service_tier": "default"},
    ),
    Field(
        "speed",
        "translated",
        "`fast`: `service_tier: priority` (OpenAI's fast processing); `standard`: nothing",
        "fast",
        {"service_tier": "priority"},
    ),
    Field(
        "stop_sequences",
        "translated",
        "`stop`",
        ["END"],
        {"stop": ["END"]},
    ),
    Field(
        "stream",
        "translated",
        "`stream` with `stream_options.include_usage` (the usage comes last); OpenAI's "
        "chunks are translated into Anthropic's events",
        True,
        {"stream": True, "stream_options": {"include_usage": True}},
    ),
    Field(
        "system",
        "translated",
        "a first `system` turn (text blocks joined)",
        "Be terse.",
        {
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": _PROMPT},
            ]
        },
    ),
    Field(
        "temperature",
        "translated",
        "`temperature` (Anthropic's 0 to 1 lies within OpenAI's 0 to 2)",
        0.2,
        {"temperature": 0.2},
    ),
    Field(
        "thinking",
        "translated",
        "`enabled`: `reasoning_effort` by `budget_tokens`: below 4096 low, below 16384 "
        "medium, below 32768 high, below 65536 xhigh, else max; `disabled`: `none`; "
        "`adaptive`: nothing (the model decides); the reply has no thinking block (chat "
        "completions return no reasoning text)",
        {"type": "enabled", "budget_tokens": 2048},
        {"reasoning_effort": "low"},
    ),
    Field(
        "thread",
        "refused",
        "OpenAI chat completions keep no threads",
        {"id": "thread_1"},
    ),
    Field(
        "tool_choice",
        "translated",
        "`auto`: `auto`; `none`: `none`; `any`: `required`; `{type: tool, name}`: that "
        "function; `disable_parallel_tool_use`: `parallel_tool_calls: false`",
        {"type": "tool", "name": "get_weather"},
        {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        needs={"tools": _ANTHROPIC_TOOLS},
    ),
    Field(
        "tools",
        "translated",
        "custom tools: function tools (`strict` kept); the web search tool: "
        "`web_search_options` (with `user_location`; domain lists and `max_uses` are "
        "refused); other server tools (bash, code execution, text editor, web fetch...) "
        "have no chat completions equivalent: refused",
        _ANTHROPIC_TOOLS,
        {"tools": _OPENAI_TOOLS},
        refused={"tools": [{"type": "bash_20250124", "name": "bash"}]},
    ),
    Field(
        "top_k",
        "refused",
        "OpenAI has no top-k sampling",
        5,
    ),
    Field(
        "top_p",
        "translated",
        "`top_p`",
        0.9,
        {"top_p": 0.9},
    ),
)

TABLES: dict[Direction, dict[str, Field]] = {
    "openai->anthropic": OPENAI_TO_ANTHROPIC,
    "anthropic->openai": ANTHROPIC_TO_OPENAI,
}
