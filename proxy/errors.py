"""Reject and the provider-shaped error bodies.

Clients use the official SDKs, which turn an error body into a typed exception only when it has
the provider's shape; so every refusal, from any phase, is rendered in the dialect of the route
the client called: OpenAI's ``{"error": {...}}`` or Anthropic's ``{"type": "error", ...}``.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.context import Dialect

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    502: "api_error",
    503: "server_overloaded",
    504: "timeout_error",
}

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


class Reject(Exception):
    """Refuse the request with an HTTP status and a provider-shaped error.

    Raise it from any request-side hook. ``code`` is the machine-readable reason (metering
    records it); ``headers`` are added to the reply (for example ``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        type: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type
        self.param = param
        self.headers = headers or {}


TRANSLATION_ERRORS = (TypeError, ValueError, KeyError, AttributeError, IndexError)
"""What a translator (``proxy.translate``) raises on a body of a shape it does not expect."""


def untranslatable_reply() -> Reject:
    """The 502 of a provider reply the gateway cannot translate into the client's dialect:
    the provider's fault, not the client's, and never a stack trace."""
    return Reject(
        502, "upstream provider returned a reply that cannot be translated", code="upstream_invalid"
    )


def error_type(status: int, dialect: Dialect) -> str:
    """The provider's error type for an HTTP status."""
    if dialect == "anthropic":
        return _ANTHROPIC_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
    return _OPENAI_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(
    dialect: Dialect,
    status: int,
    message: str,
    *,
    code: str | None = None,
    type: str | None = None,
    param: str | None = None,
) -> dict[str, Any]:
    """Build the error object a client of ``dialect`` expects."""
    if dialect == "anthropic":
        return {
            "type": "error",
            "error": {"type": type or error_type(status, dialect), "message": message},
        }
    return {
        "error": {
            "message": message,
            "type": type or error_type(status, dialect),
            "param": param,
            "code": code,
        }
    }


def reject_body(exc: Reject, dialect: Dialect) -> bytes:
    """Serialise a Reject for ``dialect``."""
    return orjson.dumps(
        error_body(dialect, exc.status, exc.message, code=exc.code, type=exc.type, param=exc.param)
    )


def convert_error(payload: bytes, status: int, source: Dialect, target: Dialect) -> bytes:
    """Re-shape a provider's error body for a client of another dialect.

    An upstream error must reach an SDK as that SDK's typed exception, keeping the message.
    A body that is not a recognisable error keeps its text as the message.
    """
    message = ""
    etype: str | None = None
    code: str | None = None
    try:
        data = orjson.loads(payload)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            if source == target:
                return payload  # already in the client's shape: pass it through untouched
            message = str(err.get("message") or "")
            etype = err.get("type") if isinstance(err.get("type"), str) else None
            code = err.get("code") if isinstance(err.get("code"), str) else None
    except orjson.JSONDecodeError:
        message = payload[:500].decode("utf-8", "replace")
    if not message:
        message = f"upstream returned HTTP {status}"
    if source != target:
        etype = None  # the other dialect's types do not carry over; derive from the status
    return orjson.dumps(error_body(target, status, message, code=code, type=etype))
