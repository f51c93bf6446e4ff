"""batching: identical in-flight requests share one provider call; small embeddings requests
are merged into one call within a time window.

Coalescing (single flight, ``coalesce``): identical requests in flight at once share one
provider call. A
whole reply is fetched inline by the first request and handed to the duplicates as bytes (if
that first client hangs up, the duplicates start over, one of them leading). A stream's call
runs in a task of its own that every request for the key (the first included) subscribes to:
events are relayed to each live, a late subscriber first gets what already arrived, and no
subscriber's disconnect cuts the others' stream; the call is cancelled only when its last
subscriber left. An error reaches every subscriber. Followers are marked
``ctx.shared = "coalesced"`` (metering bills them no provider cost).

Embeddings batching (``embeddings``): requests for the same provider, model and parameters
arriving within ``window`` go upstream as one call with an input array (at most ``max_inputs``), and each
caller gets its own vectors and its share of the usage (by the length of its inputs; the shares
add up to the provider's count). A request that cannot be batched passes through untouched.

Tenant isolation, the same rule for both: a call is shared only by requests of one ``scope``
(the user by default, as in the cache; ``tier`` or ``global`` only when the policy says so)
whose forwarded headers are identical. The merged call carries its first caller's headers and
body parameters, so sharing it across different headers (``OpenAI-Project``, a client's
``user``) would apply one caller's provider account or attribution to another's inputs. When a
merged call fails with a client error that one member's input may have caused (400, 413, 422,
...), each member is sent again on its own, so everyone gets their own answer or error; errors
that are the same for every member by construction (401, 403, 404, 429) are shared as they are.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from plugins.batching.coalesce import Coalescer, flight_key
from plugins.batching.embeddings import Batcher, batch_key
from proxy.appkeys import METRICS
from proxy.context import RequestContext, UpstreamCall, UpstreamRequest, UpstreamResponse
from proxy.fingerprint import Scope, canonical
from proxy.hookspecs import hookimpl
from proxy.policy import Policy, Seconds

log = logging.getLogger("tollway.batching")


class BatchingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    coalesce: bool = Field(True, description="Share one provider call among identical requests.")
    scope: Scope = Field(
        "user",
        description="Who may share a call or a merged embeddings batch: user, tier or global.",
    )
    window: Seconds = Field(0.1, ge=0, description="How long an embeddings batch waits to fill.")
    max_inputs: int = Field(64, ge=1, description="Most inputs in one merged embeddings call.")
    embeddings: bool = Field(True, description="Merge small embeddings requests.")


class BatchingPlugin:
    """Takes over the provider call for coalescing and embeddings batching."""

    Config = BatchingConfig

    def __init__(self, config: BatchingConfig, policy: Policy) -> None:
        self.config = config
        self.coalescer = Coalescer()
        self.batcher = Batcher(config.window, config.max_inputs)

    @hookimpl
    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        c, b = self.coalescer, self.batcher
        app[METRICS].add(
            "batching",
            lambda: {
                "tollway_coalesced_requests": (
                    "counter",
                    "Requests answered by another request's provider call.",
                    c.coalesced,
                    (),
                ),
                "tollway_batched_requests": (
                    "counter",
                    "Embeddings requests merged into a shared call.",
                    b.batched,
                    (),
                ),
                "tollway_batch_calls": ("counter", "Merged embeddings calls sent.", b.calls, ()),
                "tollway_batch_splits": (
                    "counter",
                    "Merged embeddings calls refused with a client error, then sent again one "
                    "request at a time.",
                    b.splits,
                    (),
                ),
            },
        )
        yield

    @hookimpl
    async def send_upstream(
        self, ctx: RequestContext, req: UpstreamRequest, call: UpstreamCall
    ) -> UpstreamResponse | None:
        if ctx.endpoint == "embeddings" and self.config.embeddings:
            inputs = Batcher.inputs_of(req.body)
            if inputs is not None and len(inputs) < self.config.max_inputs:
                bkey = batch_key(ctx, req, self.config.scope)
                if bkey is not None:
                    return await self.batcher.send(bkey, ctx, req, call, inputs)
        if self.config.coalesce:
            # an in-process key: the canonical bytes, not their SHA-256 (the cache's key)
            key = flight_key(canonical(ctx, self.config.scope), req)
            if not req.stream:
                return await self.coalescer.send_whole(key, ctx, req, call)
            # a stream is shared live: its call runs in a task of its own, so a disconnecting
            # client (the first one included) never cuts the others' stream
            return await self.coalescer.send(key, ctx, req, call)
        return None
