"""Pure translation between OpenAI Chat Completions and Anthropic Messages, both ways, and
from the OpenAI Responses API to Chat Completions and back (``responses``).

The gateway lets an OpenAI SDK client call a Claude model and an Anthropic SDK client call an
OpenAI model, so requests, whole responses and stream events all need a faithful mapping that
the official SDKs parse. This package does no I/O, makes no deep copies and no JSON round trips
except for tool arguments, which one side keeps as a string.

One module per phase, each both ways: ``request`` (the client's body, before the call),
``response`` (a whole reply) and ``stream`` (SSE events, one at a time); ``common`` holds what
they share. Callers use the names re-exported here (``proxy.translate.<name>``).
"""

from __future__ import annotations

from proxy.translate.common import chat_finish_to_stop, stop_to_chat_finish
from proxy.translate.fields import Unsupported
from proxy.translate.request import (
    DEFAULT_MAX_TOKENS,
    chat_to_messages_request,
    messages_to_chat_request,
)
from proxy.translate.response import chat_response_to_messages, messages_response_to_chat
from proxy.translate.responses import (
    ChatStreamToResponses,
    chat_response_to_responses,
    responses_input_items,
    responses_to_chat_request,
)
from proxy.translate.stream import ChatStreamToMessages, MessagesStreamToChat, StreamError

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "ChatStreamToMessages",
    "ChatStreamToResponses",
    "MessagesStreamToChat",
    "StreamError",
    "Unsupported",
    "chat_finish_to_stop",
    "chat_response_to_messages",
    "chat_response_to_responses",
    "chat_to_messages_request",
    "messages_response_to_chat",
    "messages_to_chat_request",
    "responses_input_items",
    "responses_to_chat_request",
    "stop_to_chat_finish",
]
