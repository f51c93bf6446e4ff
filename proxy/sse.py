"""Server-sent events: split a byte stream into events, frame events, spot the usage chunk.

A provider stream arrives in arbitrary TCP-sized pieces; the relay forwards whole events as
soon as each is complete, and parses JSON only for the few events that carry usage (OpenAI's
last chunk, Anthropic's message_start and message_delta; their counts are read by
``proxy.tokens``) unless a plugin asks for every event.
"""

from __future__ import annotations

import orjson

DONE = b"[DONE]"


class EventSplitter:
    """Accumulates bytes and yields complete raw events (without the blank-line terminator)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        buf = self._buf + chunk if self._buf else chunk
        if b"\n\n" not in buf:
            self._buf = buf
            return []
        parts = buf.split(b"\n\n")
        self._buf = parts.pop()
        return [p for p in parts if p]

    def rest(self) -> bytes:
        """Bytes of an unterminated last event (a stream cut short)."""
        out, self._buf = self._buf, b""
        return out


def parse_event(raw: bytes) -> tuple[str | None, bytes]:
    """Return (event name, data) of one raw event; data lines are joined with newlines."""
    if raw.startswith(b"data: ") and b"\n" not in raw:
        return None, raw[6:]
    name: str | None = None
    data: list[bytes] = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode()
    return name, b"\n".join(data)


def frame(data: bytes, event: str | None = None) -> bytes:
    """One SSE frame; ``event`` adds the ``event:`` line Anthropic clients expect."""
    if event is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


def frame_json(obj: object, event: str | None = None) -> bytes:
    return frame(orjson.dumps(obj), event)


def is_usage_only_chunk(data: bytes) -> bool:
    """True for OpenAI's final usage chunk (``"choices": []``), withheld if not asked for."""
    return b'"choices":[]' in data or b'"choices": []' in data
