"""Response translation: a ``chat.completion`` -> an OpenAI Responses ``response`` object.

Also what the stream translation shares with it: the Response skeleton that echoes the
request's parameters as OpenAI does (defaults filled in: ``tool_choice: auto``,
``temperature: 1.0``, ``store: true``...), item ids, the usage object and the final status.
Item ids derive from the response id (``msg_<id>``, ``fc_<id>_<n>``): unique as the response
id is, and the same on every translation of one reply.
"""

from __future__ import annotations

import time
from typing import Any

from proxy.tokens import openai_tokens

# finish_reason -> Responses ``incomplete_details.reason`` (the reply stopped short)
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def _suffix(response_id: str) -> str:
    """The unique part of a response id, for the ids of its items."""
    return response_id[5:] if response_id.startswith("resp_") else response_id


def message_id(response_id: str, n: int = 0) -> str:
    """The id of the response's ``n``-th message item."""
    return f"msg_{_suffix(response_id)}" + (f"_{n}" if n else "")


def call_item_id(response_id: str, n: int) -> str:
    """The id of the response's ``n``-th function-call item."""
    return f"fc_{_suffix(response_id)}_{n}"


def _echo_tool(tool: Any) -> Any:
    """A function tool as OpenAI echoes it: ``description`` and ``strict`` always present
    (``strict`` as sent: it is passed on to the chat provider only when the client set it)."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        return tool
    return {
        "type": "function",
        "name": tool.get("name"),
        "description": tool.get("description"),
        "parameters": tool.get("parameters"),
        "strict": tool.get("strict"),
    }


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def response_skeleton(
    request: dict[str, Any], response_id: str, model: str, created_at: int
) -> dict[str, Any]:
    """An in-progress Response echoing ``request``'s parameters, with no output yet."""
    text = request.get("text")
    text = text if isinstance(text, dict) else {}
    reasoning = request.get("reasoning")
    reasoning = reasoning if isinstance(reasoning, dict) else {}
    tools = request.get("tools")
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "max_tool_calls": request.get("max_tool_calls"),
        "model": model,
        "output": [],
        "parallel_tool_calls": _or(request.get("parallel_tool_calls"), True),
        "previous_response_id": request.get("previous_response_id"),
        "prompt_cache_key": request.get("prompt_cache_key"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "safety_identifier": request.get("safety_identifier"),
        "service_tier": _or(request.get("service_tier"), "default"),
        "store": _or(request.get("store"), True),
        "temperature": _or(request.get("temperature"), 1.0),
        "text": {
            "format": _or(text.get("format"), {"type": "text"}),
            "verbosity": _or(text.get("verbosity"), "medium"),
        },
        "tool_choice": _or(request.get("tool_choice"), "auto"),
        "tools": [_echo_tool(t) for t in tools] if isinstance(tools, list) else [],
        "top_logprobs": _or(request.get("top_logprobs"), 0),
        "top_p": _or(request.get("top_p"), 1.0),
        "truncation": _or(request.get("truncation"), "disabled"),
        "usage": None,
        "user": request.get("user"),
        "metadata": _or(request.get("metadata"), {}),
    }


def responses_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """A chat ``usage`` object -> the Responses one (cached and reasoning tokens kept)."""
    prompt, completion = openai_tokens(usage)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": int(cached), "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": int(reasoning)},
        "total_tokens": prompt + completion,
    }


def finish_status(response: dict[str, Any], finish: str | None) -> str:
    """Set the final status from the chat ``finish_reason``; returns the items' status."""
    reason = _INCOMPLETE.get(finish or "")
    if reason is None:
        response["status"] = "completed"
        response["completed_at"] = int(time.time())
        return "completed"
    response["status"] = "incomplete"
    response["incomplete_details"] = {"reason": reason}
    return "incomplete"


def chat_logprobs(logprobs: Any) -> list[dict[str, Any]]:
    """Chat ``logprobs.content`` -> Responses ``logprobs`` (the same entries; bytes filled)."""
    out = []
    for entry in (logprobs or {}).get("content") or ():
        token = entry.get("token", "")
        out.append(
            {
                "token": token,
                "logprob": entry.get("logprob", 0.0),
                "bytes": entry.get("bytes") or list(token.encode()),
                "top_logprobs": [
                    {
                        "token": top.get("token", ""),
                        "logprob": top.get("logprob", 0.0),
                        "bytes": top.get("bytes") or list(top.get("token", "").encode()),
                    }
                    for top in entry.get("top_logprobs") or ()
                ],
            }
        )
    return out


def _annotations(message: dict[str, Any]) -> list[dict[str, Any]]:
    """Chat's nested ``url_citation`` annotations -> the flat Responses ones."""
    out = []
    for a in message.get("annotations") or ():
        cite = a.get("url_citation") if isinstance(a, dict) else None
        if isinstance(cite, dict):
            out.append(
                {
                    "type": "url_citation",
                    "start_index": cite.get("start_index", 0),
                    "end_index": cite.get("end_index", 0),
                    "url": cite.get("url", ""),
                    "title": cite.get("title", ""),
                }
            )
    return out


def chat_response_to_responses(
    chat: dict[str, Any],
    request: dict[str, Any],
    response_id: str,
    model: str,
    created_at: int,
) -> dict[str, Any]:
    """A whole ``chat.completion`` -> a Response object (first choice only).

    The assistant's text (and refusal) becomes one message item; each tool call a
    ``function_call`` item after it. ``finish_reason: length`` makes the response
    ``incomplete`` (``max_output_tokens``), as a content filter does.
    """
    response = response_skeleton(request, response_id, model, created_at)
    choices = chat.get("choices") or ()
    choice = choices[0] if choices else {}
    message = choice.get("message") or {}
    status = finish_status(response, choice.get("finish_reason"))
    content: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, list):  # some compatible servers send parts
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    if text:
        part = {"type": "output_text", "text": text, "annotations": _annotations(message)}
        part["logprobs"] = chat_logprobs(choice.get("logprobs"))
        content.append(part)
    if message.get("refusal"):
        content.append({"type": "refusal", "refusal": message["refusal"]})
    output = response["output"]
    if content:
        output.append(
            {
                "id": message_id(response_id),
                "type": "message",
                "status": status,
                "role": "assistant",
                "content": content,
            }
        )
    for n, call in enumerate(message.get("tool_calls") or ()):
        fn = call.get("function") or {}
        output.append(
            {
                "id": call_item_id(response_id, n),
                "type": "function_call",
                "status": "completed",
                "call_id": call.get("id") or call_item_id(response_id, n),
                "name": fn.get("name") or "",
                "arguments": fn.get("arguments") or "",
            }
        )
    usage = chat.get("usage")
    if isinstance(usage, dict):
        response["usage"] = responses_usage(usage)
    return response
