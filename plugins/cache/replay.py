"""One canonical form of a reply for the response cache: assemble streams, replay bodies.

A cache that kept streamed and whole replies apart would miss half its hits and store every
answer twice. Instead it keeps the whole reply body (what a non-streaming client receives) and
converts at the edges: ``Assembler`` folds the events of a streamed reply, already in the
client's dialect, into that body as they are relayed; ``replay`` turns a stored body back into
the ready SSE frames of a valid stream. Both are pure and do no I/O, and text is gathered in
lists and joined once, so assembling a long reply stays linear.

The round trip ``Assembler(replay(body)) == body`` is exact except for what a stream cannot
carry (SDKs cannot rebuild these from a real provider stream either):

* chat: ``message.annotations`` and ``message.audio`` (absent from chunk deltas), and any
  unknown top-level or per-choice field; ``usage`` when the stream has no usage chunk (the
  client did not ask for ``include_usage``).
* completions: unknown fields; ``usage`` likewise.
* messages: nothing known: unknown block types are sent whole in ``content_block_start``.

An assembled chat message always has ``refusal`` (``None`` if absent), as OpenAI's bodies do.

Kept through the round trip: id, model, created, ``system_fingerprint``/``service_tier`` (on
every OpenAI chunk, as OpenAI sends them), logprobs (on each choice's first chunk), refusals,
legacy ``function_call``, tool calls (``id``/``type``/``name`` first, then argument pieces),
thinking with its signature, citations, Anthropic ``stop_details``/``container`` and the full
usage object (cache and server-tool counts included).
"""

from __future__ import annotations

from typing import Any

import orjson

from plugins.cache.responses_replay import ResponsesAssembler, replay_responses
from proxy.sse import DONE, frame, frame_json

PIECE_CHARS = 64
"""Text is replayed in pieces of this many characters, so a replay looks like a real stream."""

_OPENAI_CARRIED = ("system_fingerprint", "service_tier")
_STOP_KEYS = ("stop_reason", "stop_sequence", "stop_details", "container")
_DELTA_USAGE = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "server_tool_use",
    "output_tokens_details",
)


def _pieces(text: str) -> list[str]:
    """Split text for streaming; code points are never cut, so each piece encodes cleanly."""
    return [text[i : i + PIECE_CHARS] for i in range(0, len(text), PIECE_CHARS)]


def _merge(acc: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """Accumulate an OpenAI delta object the way the OpenAI SDK does: strings concatenate,
    objects merge, ``type`` is replaced; ``None`` never overwrites a value."""
    for key, value in delta.items():
        old = acc.get(key)
        if old is None or key == "type":
            acc[key] = _merge({}, value) if isinstance(value, dict) else value
        elif isinstance(old, str) and isinstance(value, str):
            acc[key] = old + value
        elif isinstance(old, dict) and isinstance(value, dict):
            _merge(old, value)
        elif value is not None:
            acc[key] = value
    return acc


def _merge_logprobs(acc: dict[str, Any] | None, new: Any) -> dict[str, Any] | None:
    """Logprobs arrive per chunk as lists (chat ``content``/``refusal``, legacy ``tokens``...)."""
    if not isinstance(new, dict):
        return acc
    if acc is None:
        return {k: list(v) if isinstance(v, list) else v for k, v in new.items()}
    for key, value in new.items():
        old = acc.get(key)
        if isinstance(value, list):
            if isinstance(old, list):
                old.extend(value)
            else:
                acc[key] = list(value)
        elif old is None:
            acc[key] = value
    return acc


# --- Assembling -------------------------------------------------------------------------------


class _ChatChoice:
    __slots__ = ("calls", "content", "finish", "function_call", "logprobs", "refusal", "role")

    def __init__(self) -> None:
        self.role = "assistant"
        self.content: list[str] | None = None
        self.refusal: list[str] | None = None
        self.calls: dict[int, dict[str, Any]] = {}
        self.function_call: dict[str, Any] | None = None
        self.logprobs: dict[str, Any] | None = None
        self.finish: str | None = None


class _TextChoice:
    __slots__ = ("finish", "logprobs", "text")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.logprobs: dict[str, Any] | None = None
        self.finish: str | None = None


class _OpenAIAssembler:
    """Chat and legacy completion chunks share their envelope, usage and error handling."""

    __slots__ = ("_chat", "_choices", "_failed", "_head", "_n", "_usage")

    def __init__(self, chat: bool, n: int) -> None:
        self._chat = chat
        self._n = n
        self._head: dict[str, Any] = {}
        self._choices: dict[int, Any] = {}
        self._usage: Any = None
        self._failed = False

    def feed(self, name: str | None, data: dict[str, Any]) -> None:
        if data.get("error") is not None:
            self._failed = True  # an error event mid-stream: the reply is not whole
            return
        head = self._head
        if not head:
            head.update((k, data[k]) for k in ("id", "created", "model") if k in data)
        for key in _OPENAI_CARRIED:
            if key in data and (data[key] is not None or key not in head):
                head[key] = data[key]
        if data.get("usage") is not None:
            self._usage = data["usage"]
        for choice in data.get("choices") or ():
            index = choice.get("index", 0)
            state: Any = self._choices.get(index)
            if state is None:
                state = self._choices[index] = _ChatChoice() if self._chat else _TextChoice()
            if choice.get("logprobs") is not None:
                state.logprobs = _merge_logprobs(state.logprobs, choice["logprobs"])
            if choice.get("finish_reason"):
                state.finish = choice["finish_reason"]
            if self._chat:
                self._chat_delta(state, choice.get("delta") or {})
            elif choice.get("text"):
                state.text.append(choice["text"])

    @staticmethod
    def _chat_delta(state: _ChatChoice, delta: dict[str, Any]) -> None:
        if delta.get("role"):
            state.role = delta["role"]
        content = delta.get("content")
        if content is not None:
            if state.content is None:
                state.content = []
            state.content.append(content)
        refusal = delta.get("refusal")
        if refusal is not None:
            if state.refusal is None:
                state.refusal = []
            state.refusal.append(refusal)
        for call in delta.get("tool_calls") or ():
            entry = state.calls.setdefault(call.get("index", 0), {})
            _merge(entry, {k: v for k, v in call.items() if k != "index"})
        if delta.get("function_call"):
            state.function_call = _merge(state.function_call or {}, delta["function_call"])

    def result(self) -> dict[str, Any] | None:
        choices = self._choices
        # exactly choices 0..n-1, all finished: a choice that never started (a stream cut
        # between choices, or an empty legacy choice whose only chunk is its finish) is unseen
        if (
            self._failed
            or len(choices) != self._n
            or any(c.finish is None for c in choices.values())
        ):
            return None
        if any(i not in choices for i in range(self._n)):
            return None
        head = self._head
        out: dict[str, Any] = {
            "id": head.get("id", ""),
            "object": "chat.completion" if self._chat else "text_completion",
            "created": head.get("created", 0),
            "model": head.get("model", ""),
            "choices": [self._choice(i, choices[i]) for i in sorted(choices)],
        }
        for key in _OPENAI_CARRIED:
            if key in head:
                out[key] = head[key]
        if self._usage is not None:
            out["usage"] = self._usage
        return out

    def _choice(self, index: int, state: Any) -> dict[str, Any]:
        if not self._chat:
            text = "".join(state.text)
            return {
                "text": text,
                "index": index,
                "logprobs": state.logprobs,
                "finish_reason": state.finish,
            }
        message: dict[str, Any] = {
            "role": state.role,
            "content": None if state.content is None else "".join(state.content),
            "refusal": None if state.refusal is None else "".join(state.refusal),
        }
        if state.calls:
            message["tool_calls"] = [state.calls[i] for i in sorted(state.calls)]
        if state.function_call is not None:
            message["function_call"] = state.function_call
        return {
            "index": index,
            "message": message,
            "logprobs": state.logprobs,
            "finish_reason": state.finish,
        }


class _MessagesAssembler:
    """Anthropic events: blocks by index; text and tool JSON gathered in parts, joined once."""

    __slots__ = ("_blocks", "_done", "_failed", "_json", "_message", "_parts")

    def __init__(self) -> None:
        self._message: dict[str, Any] | None = None
        self._blocks: dict[int, dict[str, Any]] = {}
        self._parts: dict[tuple[int, str], list[str]] = {}  # (index, "text"/"thinking") -> parts
        self._json: dict[int, list[str]] = {}  # index -> partial_json pieces of a tool input
        self._done = False
        self._failed = False

    def feed(self, name: str | None, data: dict[str, Any]) -> None:
        kind = data.get("type") or name
        if kind == "content_block_delta":
            index = data.get("index", 0)
            delta = data.get("delta") or {}
            dkind = delta.get("type")
            if dkind == "text_delta":
                self._parts.setdefault((index, "text"), []).append(delta.get("text", ""))
            elif dkind == "input_json_delta":
                self._json.setdefault(index, []).append(delta.get("partial_json", ""))
            elif dkind == "thinking_delta":
                self._parts.setdefault((index, "thinking"), []).append(delta.get("thinking", ""))
            elif dkind == "signature_delta":
                self._blocks.setdefault(index, {})["signature"] = delta.get("signature", "")
            elif dkind == "citations_delta":
                block = self._blocks.setdefault(index, {})
                if not isinstance(block.get("citations"), list):
                    block["citations"] = []
                block["citations"].append(delta.get("citation"))
        elif kind == "content_block_start":
            block = dict(data.get("content_block") or {})
            if isinstance(block.get("citations"), list):
                block["citations"] = list(block["citations"])
            self._blocks[data.get("index", 0)] = block
        elif kind == "message_start":
            message = dict(data.get("message") or {})
            message["usage"] = dict(message.get("usage") or {})
            for i, block in enumerate(message.get("content") or ()):
                self._blocks[i] = dict(block)
            self._message = message
        elif kind == "message_delta" and self._message is not None:
            self._message.update(data.get("delta") or {})
            usage = data.get("usage") or {}
            # cumulative counts: they replace message_start's; ``None`` means "not reported"
            self._message["usage"].update((k, v) for k, v in usage.items() if v is not None)
        elif kind == "message_stop":
            self._done = True
        elif kind == "error":
            self._failed = True

    def result(self) -> dict[str, Any] | None:
        if self._failed or not self._done or self._message is None:
            return None
        blocks = {i: dict(b) for i, b in self._blocks.items()}
        for (index, key), parts in self._parts.items():
            block = blocks.setdefault(index, {})
            block[key] = block.get(key, "") + "".join(parts)
        for index, pieces in self._json.items():
            raw = "".join(pieces)
            if raw:
                try:
                    blocks.setdefault(index, {})["input"] = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    return None  # a cut or corrupt tool input must never be cached
        return {**self._message, "content": [blocks[i] for i in sorted(blocks)]}


class Assembler:
    """Collects the events of a streamed reply (already in the CLIENT's dialect) into the
    equivalent whole reply body, so a streamed miss can fill the cache for both kinds of hit.

    ``endpoint`` is ``"chat"`` (``chat.completion.chunk``), ``"completions"`` (legacy
    ``text_completion`` chunks), ``"messages"`` (Anthropic events) or ``"responses"`` (the
    Responses API's events: ``plugins.cache.responses_replay``). ``n`` is the OpenAI
    request's ``n``: a stream only shows the choices that have started, so without it a stream
    cut before its last choice began would look whole. Anthropic replies have one message.
    """

    __slots__ = ("_impl",)

    def __init__(self, endpoint: str, *, n: int = 1) -> None:
        self._impl: _OpenAIAssembler | _MessagesAssembler | ResponsesAssembler
        if endpoint == "messages":
            self._impl = _MessagesAssembler()
        elif endpoint in ("chat", "completions"):
            self._impl = _OpenAIAssembler(endpoint == "chat", n)
        elif endpoint == "responses":
            self._impl = ResponsesAssembler()
        else:
            raise ValueError(f"no streamed replies for endpoint {endpoint!r}")

    def feed(self, name: str | None, data: dict[str, Any]) -> None:
        """One SSE event: ``name`` is its ``event:`` (Anthropic) or ``None``; ``data`` parsed."""
        self._impl.feed(name, data)

    def result(self) -> dict[str, Any] | None:
        """The whole reply, or ``None`` if the stream was cut short (no finish reason on some
        choice / no ``message_stop``), carried an error event or a tool input that is not JSON:
        an incomplete reply must never be cached."""
        return self._impl.result()


# --- Replaying --------------------------------------------------------------------------------


def _replay_openai(chat: bool, body: dict[str, Any], include_usage: bool) -> list[bytes]:
    """Chunks per choice in index order (the SDK's accumulator needs choices to appear in
    order); with ``include_usage`` every chunk has ``"usage": null`` and a last ``choices: []``
    chunk carries the usage, exactly as OpenAI streams it."""
    head: dict[str, Any] = {
        "id": body.get("id", ""),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": body.get("created", 0),
        "model": body.get("model", ""),
    }
    head.update((k, body[k]) for k in _OPENAI_CARRIED if k in body)
    tail: dict[str, Any] = {"usage": None} if include_usage else {}
    out: list[bytes] = []

    def emit(choice: dict[str, Any]) -> None:
        out.append(frame_json({**head, "choices": [choice], **tail}))

    for choice in sorted(body.get("choices") or (), key=lambda c: c.get("index", 0)):
        i = choice.get("index", 0)
        logprobs = choice.get("logprobs")
        if not chat:
            for piece in _pieces(choice.get("text") or ""):
                emit({"text": piece, "index": i, "logprobs": logprobs, "finish_reason": None})
                logprobs = None
            finish = choice.get("finish_reason")
            emit({"text": "", "index": i, "logprobs": logprobs, "finish_reason": finish})
            continue

        def delta(d: dict[str, Any], finish: str | None = None, i: int = i) -> None:
            emit({"index": i, "delta": d, "logprobs": None, "finish_reason": finish})

        msg = choice.get("message") or {}
        content, refusal = msg.get("content"), msg.get("refusal")
        first = {
            "role": msg.get("role") or "assistant",
            "content": "" if isinstance(content, str) else None,
            "refusal": "" if isinstance(refusal, str) else None,
        }
        emit({"index": i, "delta": first, "logprobs": logprobs, "finish_reason": None})
        for piece in _pieces(content) if isinstance(content, str) else ():
            delta({"content": piece})
        for piece in _pieces(refusal) if isinstance(refusal, str) else ():
            delta({"refusal": piece})
        for n, call in enumerate(msg.get("tool_calls") or ()):
            fn = call.get("function")
            if not isinstance(fn, dict):  # not a function call: no split format, send it whole
                delta({"tool_calls": [{"index": n, **call}]})
                continue
            opening = {"name": fn.get("name", ""), "arguments": ""}
            call_delta = {"index": n, **call, "function": opening}
            delta({"tool_calls": [call_delta]})
            for piece in _pieces(fn.get("arguments") or ""):
                delta({"tool_calls": [{"index": n, "function": {"arguments": piece}}]})
        fcall = msg.get("function_call")
        if isinstance(fcall, dict):
            delta({"function_call": {"name": fcall.get("name", ""), "arguments": ""}})
            for piece in _pieces(fcall.get("arguments") or ""):
                delta({"function_call": {"arguments": piece}})
        delta({}, choice.get("finish_reason"))

    usage = body.get("usage")
    if include_usage and usage is not None:
        out.append(frame_json({**head, "choices": [], "usage": usage}))
    out.append(frame(DONE))
    return out


def _block_events(index: int, block: dict[str, Any]) -> list[bytes]:
    """content_block_start (the block with its streamed fields emptied), deltas, stop."""
    kind = block.get("type")
    deltas: list[dict[str, Any]] = []
    if kind == "text":
        start = {**block, "text": ""}
        deltas = [{"type": "text_delta", "text": p} for p in _pieces(block.get("text") or "")]
        citations = block.get("citations")
        if isinstance(citations, list):
            start["citations"] = []
            deltas += [{"type": "citations_delta", "citation": c} for c in citations]
    elif kind == "thinking":
        start = {**block, "thinking": "", "signature": ""}
        text = block.get("thinking") or ""
        deltas = [{"type": "thinking_delta", "thinking": p} for p in _pieces(text)]
        if block.get("signature"):
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
    elif kind in ("tool_use", "server_tool_use"):
        start = {**block, "input": {}}
        encoded = orjson.dumps(block.get("input") or {}).decode()
        deltas = [{"type": "input_json_delta", "partial_json": p} for p in _pieces(encoded)]
    else:
        start = block  # results, redacted thinking, future kinds: whole in the start event
    events = [
        frame_json(
            {"type": "content_block_start", "index": index, "content_block": start},
            "content_block_start",
        )
    ]
    events.extend(
        frame_json(
            {"type": "content_block_delta", "index": index, "delta": d}, "content_block_delta"
        )
        for d in deltas
    )
    events.append(frame_json({"type": "content_block_stop", "index": index}, "content_block_stop"))
    return events


def _replay_messages(body: dict[str, Any]) -> list[bytes]:
    """message_start holds everything but content and the stop fields; output tokens are 0
    there and counted in message_delta, whose usage is cumulative (as the API sends it), so a
    consumer adding the two cannot count twice."""
    usage = dict(body.get("usage") or {})
    message = {k: v for k, v in body.items() if k != "content" and k not in _STOP_KEYS}
    message.update(
        type="message",
        role=body.get("role") or "assistant",
        content=[],
        stop_reason=None,
        stop_sequence=None,
        usage={**usage, "input_tokens": usage.get("input_tokens") or 0, "output_tokens": 0},
    )
    out = [frame_json({"type": "message_start", "message": message}, "message_start")]
    for index, block in enumerate(body.get("content") or ()):
        out.extend(_block_events(index, block))
    delta = {"stop_reason": body.get("stop_reason"), "stop_sequence": body.get("stop_sequence")}
    delta.update((k, body[k]) for k in _STOP_KEYS[2:] if k in body)
    end_usage = {"output_tokens": usage.get("output_tokens") or 0}
    end_usage.update((k, usage[k]) for k in _DELTA_USAGE if usage.get(k) is not None)
    out.append(
        frame_json({"type": "message_delta", "delta": delta, "usage": end_usage}, "message_delta")
    )
    out.append(frame_json({"type": "message_stop"}, "message_stop"))
    return out


def replay(endpoint: str, body: dict[str, Any], *, include_usage: bool) -> list[bytes]:
    """The ready SSE frames of a valid stream of the whole reply ``body`` (cache hit, stream
    request). ``include_usage`` is the client's ``stream_options.include_usage`` (OpenAI only:
    Anthropic streams always carry usage). Same id/model/created as the body."""
    if endpoint == "messages":
        return _replay_messages(body)
    if endpoint in ("chat", "completions"):
        return _replay_openai(endpoint == "chat", body, include_usage)
    if endpoint == "responses":  # its usage is always in the closing event
        return replay_responses(body)
    raise ValueError(f"no streamed replies for endpoint {endpoint!r}")
