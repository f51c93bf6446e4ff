"""OpenAI embeddings: deterministic unit vectors, in float or base64.

Each vector depends on its input alone, so a batch split or merged by the gateway (batching)
gets the same vectors as one request per input.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from functools import lru_cache

from aiohttp import web

from proxy.emulator.controls import _Controls
from proxy.emulator.prompts import _model, _positive, _prompts
from proxy.emulator.replies import _count
from proxy.emulator.wire import Json, _BadRequest, _json

_MAX_DIMENSIONS = 8192
_MAX_INPUT_TOKENS = 8192  # OpenAI's embedding models: the most tokens in one input


@lru_cache(maxsize=8192)
def _vector(text: str, dim: int) -> tuple[list[float], str]:
    """A unit vector derived from one input alone, as float32 values and as base64.

    Hashing makes it deterministic and independent of the rest of a batch; the floats are
    round-tripped through float32 so both encodings decode to the same numbers. Cached because
    benchmarks embed the same texts over and over.
    """
    raw = struct.unpack(f"<{dim}h", hashlib.shake_256(text.encode()).digest(2 * dim))
    norm = math.sqrt(sum(x * x for x in raw))
    vec = [x / norm for x in raw] if norm else [1.0] + [0.0] * (dim - 1)
    packed = struct.pack(f"<{dim}f", *vec)
    return list(struct.unpack(f"<{dim}f", packed)), base64.b64encode(packed).decode("ascii")


class _EmbeddingsEndpoint:
    """``/v1/embeddings``."""

    async def embeddings(
        self, request: web.Request, body: Json, ctl: _Controls
    ) -> web.StreamResponse:
        """Embeddings in float or base64 (the openai SDK asks for base64 unless told otherwise)."""
        model, texts = _model(body), _prompts(body.get("input"), "input")
        tokens = 0
        for text in texts:  # like OpenAI, one bad input fails the whole request
            if not text:
                raise _BadRequest("'input' cannot contain an empty string", "input")
            n = _count(text)
            tokens += n
            if n > _MAX_INPUT_TOKENS:
                raise _BadRequest(
                    f"This model's maximum context length is {_MAX_INPUT_TOKENS} tokens, "
                    f"however you requested {n} tokens. Please reduce your prompt.",
                    "input",
                )
        dim = _positive(body, "dimensions", 8) or 8
        if dim > _MAX_DIMENSIONS:
            raise _BadRequest(f"'dimensions' must be at most {_MAX_DIMENSIONS}", "dimensions")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise _BadRequest("'encoding_format' must be 'float' or 'base64'", "encoding_format")
        slot = 1 if fmt == "base64" else 0
        data = [
            {"object": "embedding", "index": i, "embedding": _vector(text, dim)[slot]}
            for i, text in enumerate(texts)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return _json({"object": "list", "data": data, "model": model, "usage": usage})
