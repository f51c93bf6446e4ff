"""The openai-agents SDK through the gateway: its default Agent speaks the Responses API.

An agent with one function tool runs its whole loop through the gateway: the model calls the
tool, the SDK runs it and sends its output back, the model answers in text. Once on a GPT model
(the Responses API passed through to the provider) and once on a Claude model (translated to
messages and back), with ``Runner.run`` and with the streamed ``Runner.run_streamed``. The
emulator calls a tool when the user's message asks for it (it mentions the weather, or names
the tool) and answers in text after a tool's output, so the loop ends after two model calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from agents.items import MessageOutputItem, ToolCallItem, ToolCallOutputItem

from tests.conftest import Emulator, Gw

# the model a client names -> the provider path the emulator saw for it
ROUTES = {"gpt-5.4-mini": "/v1/responses", "claude-sonnet": "/v1/messages"}
QUESTION = "What's the weather in Paris?"
# the emulator echoes the last user message: the question in the Responses API; in Messages
# the tool's result, which travels in a user message
FINAL = {"gpt-5.4-mini": f"Echo: {QUESTION}", "claude-sonnet": "Echo: sunny in Paris"}


@pytest.fixture(autouse=True, scope="module")
def no_tracing() -> Iterator[None]:
    """The SDK exports traces to OpenAI by default: never here (no network, no key)."""
    set_tracing_disabled(True)
    yield


def forecaster(gw: Gw, key: str, model: str, seen: list[str], **settings: Any) -> Agent[Any]:
    """An agent with one tool, ``get_weather``, that records the cities it was asked for."""

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"sunny in {city}"

    return Agent(
        name="forecaster",
        instructions="Answer questions about the weather with the get_weather tool.",
        tools=[get_weather],
        model=OpenAIResponsesModel(model=model, openai_client=gw.openai(key)),
        model_settings=ModelSettings(**settings),
    )


def kinds(items: list[Any]) -> list[type]:
    return [type(i) for i in items]


@pytest.mark.parametrize("model", list(ROUTES))
async def test_agent_runs_a_tool_loop(gw: Gw, key: str, emulator: Emulator, model: str) -> None:
    seen: list[str] = []
    agent = forecaster(gw, key, model, seen)
    result = await Runner.run(agent, QUESTION)
    assert seen == ["Paris"]  # the model's call reached the tool, with its argument
    assert kinds(result.new_items) == [ToolCallItem, ToolCallOutputItem, MessageOutputItem]
    assert len(result.raw_responses) == 2  # the call, then the answer
    assert result.final_output == FINAL[model]
    last = await emulator.last()
    assert last["path"] == ROUTES[model]
    assert "sunny in Paris" in str(last["body"])  # the tool's output went back to the model


@pytest.mark.parametrize("model", list(ROUTES))
async def test_agent_streams_a_tool_loop(gw: Gw, key: str, emulator: Emulator, model: str) -> None:
    seen: list[str] = []
    agent = forecaster(gw, key, model, seen)
    result = Runner.run_streamed(agent, QUESTION)
    names, text = [], []
    async for event in result.stream_events():
        if event.type == "run_item_stream_event":
            names.append(event.name)
        elif event.type == "raw_response_event" and event.data.type == "response.output_text.delta":
            text.append(event.data.delta)
    assert seen == ["Paris"]
    assert names == ["tool_called", "tool_output", "message_output_created"]
    assert result.final_output == "".join(text) == FINAL[model]
    assert kinds(result.new_items) == [ToolCallItem, ToolCallOutputItem, MessageOutputItem]
    last = await emulator.last()
    assert last["path"] == ROUTES[model] and last["body"]["stream"] is True
    assert "sunny in Paris" in str(last["body"])
