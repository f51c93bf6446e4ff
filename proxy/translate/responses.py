"""OpenAI Responses API <-> Chat Completions, for providers that serve only chat.

A ``/v1/responses`` call to such a provider goes out as a chat request and its reply comes
back as a Response (or a Responses event stream); an Anthropic model adds the chat <->
messages step of this package on the way. Three modules, one per phase:
``responses_request`` (the request), ``responses_output`` (a whole reply, and the Response
skeleton both reply forms share) and ``responses_stream`` (events, one chunk at a time).
"""

from __future__ import annotations

from proxy.translate.responses_output import chat_response_to_responses
from proxy.translate.responses_request import responses_input_items, responses_to_chat_request
from proxy.translate.responses_stream import ChatStreamToResponses

__all__ = [
    "ChatStreamToResponses",
    "chat_response_to_responses",
    "responses_input_items",
    "responses_to_chat_request",
]
