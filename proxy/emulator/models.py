"""The model lists ``/v1/models`` answers with, serialised once since the bodies never change."""

from __future__ import annotations

import orjson
from aiohttp import web

from proxy.emulator.controls import _Controls
from proxy.emulator.wire import _JSON, Dialect, Json, _error, _json

# /v1/models answers in the shape of whichever SDK asks (Anthropic's sends anthropic-version).
_MODEL_IDS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
_CLAUDE_IDS = ("claude-sonnet-4-6", "claude-haiku-4-5")
_OPENAI_MODELS = orjson.dumps(
    {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "emulator"}
            for m in (*_MODEL_IDS, *_CLAUDE_IDS)
        ],
    }
)
_CLAUDE_INFO: dict[str, Json] = {
    m: {
        "type": "model",
        "id": m,
        "display_name": m,
        "created_at": "2025-01-01T00:00:00Z",
        "lifecycle": "active",
        "deprecated_at": None,
        "retires_at": None,
        "line": m.split("-")[1],
        "max_input_tokens": 200_000,
        "max_tokens": 64_000,
        "capabilities": None,
    }
    for m in _CLAUDE_IDS
}
_OPENAI_INFO: dict[str, Json] = {
    m: {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "emulator"}
    for m in (*_MODEL_IDS, *_CLAUDE_IDS)
}
_ANTHROPIC_MODELS = orjson.dumps(
    {
        "data": list(_CLAUDE_INFO.values()),
        "has_more": False,
        "first_id": _CLAUDE_IDS[0],
        "last_id": _CLAUDE_IDS[-1],
    }
)


class _ModelsEndpoint:
    """``/v1/models`` and ``/v1/models/{model_id}``."""

    async def model(self, request: web.Request, body: Json, ctl: _Controls) -> web.Response:
        """One model, or a 404 in the asking SDK's shape."""
        anthropic = "anthropic-version" in request.headers
        model_id = request.match_info["model_id"]
        info = (_CLAUDE_INFO if anthropic else _OPENAI_INFO).get(model_id)
        if info is None:
            dialect: Dialect = "anthropic" if anthropic else "openai"
            return _error(dialect, 404, f"model: {model_id}", param="model")
        return _json(info)

    async def models(self, request: web.Request, body: Json, ctl: _Controls) -> web.Response:
        anthropic = "anthropic-version" in request.headers
        return web.Response(
            body=_ANTHROPIC_MODELS if anthropic else _OPENAI_MODELS, content_type=_JSON
        )
