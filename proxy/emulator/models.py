"""The model lists ``/v1/models`` answers with, serialised once since the bodies never change."""

from __future__ import annotations

import orjson
from aiohttp import web

from proxy.emulator.controls import _Controls
from proxy.emulator.wire import _JSON, Json

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
_ANTHROPIC_MODELS = orjson.dumps(
    {
        "data": [
            {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
            for m in _CLAUDE_IDS
        ],
        "has_more": False,
        "first_id": _CLAUDE_IDS[0],
        "last_id": _CLAUDE_IDS[-1],
    }
)


class _ModelsEndpoint:
    """``/v1/models``."""

    async def models(self, request: web.Request, body: Json, ctl: _Controls) -> web.Response:
        anthropic = "anthropic-version" in request.headers
        return web.Response(
            body=_ANTHROPIC_MODELS if anthropic else _OPENAI_MODELS, content_type=_JSON
        )
