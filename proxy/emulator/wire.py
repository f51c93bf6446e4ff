"""What every emulator endpoint shares: the JSON type, the two dialects and their error shapes.

Errors are rendered in the shape of the dialect the route speaks, so the official SDKs raise
their typed exceptions against the emulator as they would against the provider.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import orjson
from aiohttp import web

Json = dict[str, Any]
Dialect = Literal["openai", "anthropic"]
Hdrs = Mapping[str, str] | None

_JSON = "application/json"

REQUEST_ID: web.RequestKey[dict[str, str]] = web.RequestKey("request_id", dict)
"""The request-id header of this reply, as the provider names it (``ID_HEADERS``): set by the
route wrapper, and by ``controls._stream`` on a stream (its headers go out before it returns)."""
ID_HEADERS: dict[Dialect, str] = {"openai": "x-request-id", "anthropic": "request-id"}

_ANTHROPIC_ERRORS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
_ANTHROPIC_ERRORS |= {413: "request_too_large", 429: "rate_limit_error", 500: "api_error"}
_ANTHROPIC_ERRORS |= {503: "overloaded_error", 529: "overloaded_error"}


class _BadRequest(Exception):
    """A request the real API would refuse (400, or ``status``: 404 for an unknown id);
    rendered in the route's error shape."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


def _error(
    dialect: Dialect, status: int, message: str, param: str | None = None, headers: Hdrs = None
) -> web.Response:
    """An error in the dialect's shape, so the SDKs raise their typed exceptions."""
    if dialect == "anthropic":
        kind = _ANTHROPIC_ERRORS.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        payload: Json = {"type": "error", "error": {"type": kind, "message": message}}
    else:  # OpenAI's real (type, code) pairs
        kind, code = "invalid_request_error", None
        if status == 429:
            kind, code = "requests", "rate_limit_exceeded"
        elif status == 401:
            code = "invalid_api_key"
        elif status >= 500:
            kind = "server_error"
        payload = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    body = orjson.dumps(payload)
    return web.Response(body=body, status=status, content_type=_JSON, headers=headers)


def _json(payload: Any) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type=_JSON)
