"""batching: identical in-flight requests share one provider call; small embeddings requests
are merged into one call within a time window.

Coalescing (single flight): identical requests in flight at once share one provider call. A
whole reply is fetched inline by the first request and handed to the duplicates as bytes (if
that first client hangs up, the duplicates start over, one of them leading). A stream's call
runs in a task of its own that every request for the key (the first included) subscribes to:
events are relayed to each live, a late subscriber first gets what already arrived, and no
subscriber's disconnect cuts the others' stream; the call is cancelled only when its last
subscriber left. An error reaches every subscriber. Followers are marked
``ctx.shared = "coalesced"`` (metering bills them no provider cost).

Embeddings batching: requests for the same provider, model and parameters arriving within
``window`` go upstream as one call with an input array (at most ``max_inputs``), and each
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

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from proxy.appkeys import METRICS
from proxy.context import (
    RequestContext,
    Route,
    UpstreamCall,
    UpstreamRequest,
    UpstreamResponse,
)
from proxy.errors import Reject
from proxy.fingerprint import Scope, fingerprint, scope_id
from proxy.hookspecs import hookimpl
from proxy.policy import Policy, parse_duration
from proxy.tokens import openai_tokens

log = logging.getLogger("tollway.batching")


class BatchingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    coalesce: bool = Field(True, description="Share one provider call among identical requests.")
    scope: Scope = Field(
        "user",
        description="Who may share a call or a merged embeddings batch: user, tier or global.",
    )
    window: float = Field(0.1, ge=0, description="How long an embeddings batch waits to fill.")
    max_inputs: int = Field(64, ge=1, description="Most inputs in one merged embeddings call.")
    embeddings: bool = Field(True, description="Merge small embeddings requests.")

    @field_validator("window", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)


# ---- coalescing ---------------------------------------------------------------------------


@dataclass(eq=False)
class Flight:
    """One provider call and what it produced so far, shared by its subscribers."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    chunks: list[bytes] = field(default_factory=list)
    streaming: bool = False
    done: bool = False
    error: BaseException | None = None
    subscribers: int = 0
    route: Route | None = None  # a fallback's route, when one answered
    task: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def run(self, call: UpstreamCall, req: UpstreamRequest) -> None:
        resp = None
        try:
            resp = await call(req)
            self.status, self.headers, self.route = resp.status, resp.headers, resp.route
            if resp.chunks is None:
                self.body = resp.body
            else:
                self.streaming = True
                self.notify()
                async for chunk in resp.chunks:
                    self.chunks.append(chunk)
                    self.notify()
        except asyncio.CancelledError:
            self.error = Reject(
                502, "the shared provider call was cancelled", code="upstream_error"
            )
            raise
        except BaseException as e:  # every subscriber must see the failure, whatever it is
            self.error = e
        finally:
            if resp is not None and resp.release is not None:
                resp.release()
            self.done = True
            self.notify()

    async def started(self) -> None:
        """Wait until the status is known (a whole body, the stream's start, or a failure)."""
        while not (self.done or self.streaming):
            await self.changed.wait()
        if self.error is not None and not self.streaming:
            raise self.error


_RETRY = object()


class WholeFlight:
    """A whole-reply call run inline by the request that started it (no task, no event: the
    common case, with no duplicate in flight, costs a dict insert). Duplicates wait on futures;
    if the starter's client hangs up, the call is cancelled with it and the waiting duplicates
    start again (one of them leads the next call), so no one is left without a reply."""

    __slots__ = ("waiters",)

    def __init__(self) -> None:
        self.waiters: list[asyncio.Future[Any]] = []

    def settle(self, outcome: Any, error: BaseException | None = None) -> None:
        for fut in self.waiters:
            if fut.done():
                continue  # that duplicate's client left
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(outcome)


FlightKey = tuple[str, frozenset[tuple[str, str]], bool]
"""What identical requests share: the answer's fingerprint (tenant scope included), the
forwarded headers, and whether it is streamed."""


def flight_key(fp: str, req: UpstreamRequest) -> FlightKey:
    """A request's coalescing key; a frozenset, so the clients' header order does not matter."""
    return (fp, frozenset(req.headers.items()), req.stream)


class Coalescer:
    def __init__(self) -> None:
        self.flights: dict[FlightKey, Flight] = {}
        self.whole: dict[FlightKey, WholeFlight] = {}
        self.coalesced = 0

    async def send_whole(
        self, key: FlightKey, ctx: RequestContext, req: UpstreamRequest, call: UpstreamCall
    ) -> UpstreamResponse:
        while True:
            flight = self.whole.get(key)
            if flight is None:
                break
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            flight.waiters.append(fut)
            outcome = await fut
            if outcome is not _RETRY:
                if ctx.shared is None:
                    ctx.shared = "coalesced"
                    self.coalesced += 1
                return UpstreamResponse(
                    status=outcome.status,
                    headers=dict(outcome.headers),
                    body=outcome.body,
                    route=outcome.route,
                )
        flight = self.whole[key] = WholeFlight()
        try:
            resp = await call(req)
        except asyncio.CancelledError:
            del self.whole[key]
            flight.settle(_RETRY)
            raise
        except BaseException as e:
            del self.whole[key]
            flight.settle(None, e)
            raise
        del self.whole[key]
        if flight.waiters:
            flight.settle(resp)
        return resp

    async def send(
        self, key: FlightKey, ctx: RequestContext, req: UpstreamRequest, call: UpstreamCall
    ) -> UpstreamResponse:
        flight = self.flights.get(key)
        if flight is None:
            flight = Flight()
            self.flights[key] = flight
            flight.task = asyncio.get_running_loop().create_task(flight.run(call, req))
            flight.task.add_done_callback(lambda _t: self._forget(key, flight))
        else:
            ctx.shared = "coalesced"
            self.coalesced += 1
        flight.subscribers += 1
        try:
            await flight.started()
        except BaseException:
            self._leave(flight)
            raise
        if not flight.streaming:
            self._leave(flight)
            return UpstreamResponse(
                status=flight.status,
                headers=dict(flight.headers),
                body=flight.body,
                route=flight.route,
            )
        return UpstreamResponse(
            status=flight.status,
            headers=dict(flight.headers),
            chunks=self._follow(flight),
            release=lambda: None,
            route=flight.route,
        )

    async def _follow(self, flight: Flight) -> Any:
        i = 0
        try:
            while True:
                while i < len(flight.chunks):
                    yield flight.chunks[i]
                    i += 1
                if flight.done:
                    if flight.error is not None:
                        raise flight.error
                    return
                await flight.changed.wait()
        finally:
            self._leave(flight)

    def _leave(self, flight: Flight) -> None:
        flight.subscribers -= 1
        if flight.subscribers <= 0 and not flight.done and flight.task is not None:
            flight.task.cancel()  # nobody is listening any more: stop paying for it

    def _forget(self, key: FlightKey, flight: Flight) -> None:
        if self.flights.get(key) is flight:
            del self.flights[key]


# ---- embeddings batching -------------------------------------------------------------------


BatchKey = tuple[Any, ...]

_SAME_FOR_EVERY_MEMBER = frozenset({401, 403, 404, 429})
"""Client errors of a merged call that no single member's input causes: the members share the
key, the model and the headers, so each would get the same alone (and a 429 is made worse by
more calls). Any other 4xx may be one member's input: the members are then sent one by one."""


def batch_key(ctx: RequestContext, req: UpstreamRequest, scope: Scope) -> BatchKey | None:
    """What requests must share to be merged into one call; None: this one is sent alone.

    The tenant scope, the provider URL, every body parameter but ``input`` (model, encoding,
    dimensions, the client's ``user``), the headers the call would carry and the fallbacks:
    the merged call is the first caller's request with everyone's inputs, so nothing of it may
    differ between them. A few microseconds: the parameters without the inputs are tiny.
    """
    try:
        params = orjson.dumps(
            {k: v for k, v in req.body.items() if k != "input"}, option=orjson.OPT_SORT_KEYS
        )
    except orjson.JSONEncodeError:
        return None
    return (
        scope_id(ctx, scope),
        req.provider,
        req.url,
        params,
        frozenset(req.headers.items()),
        ctx.fallbacks,
    )


@dataclass(eq=False)
class _Caller:
    ctx: RequestContext
    req: UpstreamRequest  # its own request: sent as it is if the merged call must be split
    call: UpstreamCall  # its provider call: the merged call is made with a present member's
    inputs: list[str]
    future: asyncio.Future[UpstreamResponse]  # cancelled when its client leaves


@dataclass(eq=False)
class _Batch:
    req: UpstreamRequest  # the first caller's: the members share all of it but the inputs
    callers: list[_Caller] = field(default_factory=list)
    size: int = 0
    timer: asyncio.TimerHandle | None = None


class Batcher:
    def __init__(self, window: float, max_inputs: int) -> None:
        self.window = window
        self.max_inputs = max_inputs
        self.open: dict[BatchKey, _Batch] = {}
        self.batched = 0
        self.calls = 0
        self.splits = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @staticmethod
    def inputs_of(body: dict[str, Any]) -> list[str] | None:
        value = body.get("input")
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return value
        return None  # token arrays and odd shapes pass through untouched

    async def send(
        self,
        key: BatchKey,
        ctx: RequestContext,
        req: UpstreamRequest,
        call: UpstreamCall,
        inputs: list[str],
    ) -> UpstreamResponse:
        batch = self.open.get(key)
        if batch is not None and batch.size + len(inputs) > self.max_inputs:
            self._flush(key)
            batch = None
        if batch is None:
            batch = _Batch(req)
            self.open[key] = batch
            batch.timer = asyncio.get_running_loop().call_later(self.window, self._flush, key)
        fut: asyncio.Future[UpstreamResponse] = asyncio.get_running_loop().create_future()
        batch.callers.append(_Caller(ctx, req, call, inputs, fut))
        batch.size += len(inputs)
        if batch.size >= self.max_inputs:
            self._flush(key)
        if len(batch.callers) > 1:
            ctx.shared = "batched"
        try:
            return await asyncio.shield(fut)  # a leaving client must not cancel the others' call
        except asyncio.CancelledError:
            fut.cancel()  # its client left: the batch sends nobody's inputs for it
            raise

    def _flush(self, key: BatchKey) -> None:
        batch = self.open.pop(key, None)
        if batch is None:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._call(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, batch: _Batch) -> None:
        # a caller whose client left during the window is gone (its future was cancelled):
        # its inputs are not sent, and the call is made on a present one's behalf
        callers = [c for c in batch.callers if not c.future.done()]
        if not callers:
            return
        call = callers[0].call
        if len(callers) > 1:
            self.batched += len(callers)
        self.calls += 1
        merged = [text for c in callers for text in c.inputs]
        req = UpstreamRequest(
            method=batch.req.method,
            url=batch.req.url,
            headers=batch.req.headers,
            body={**batch.req.body, "input": merged},
            provider=batch.req.provider,
            kind=batch.req.kind,
            stream=False,
        )
        try:
            resp = await call(req)
            if resp.release is not None:
                resp.release()
            if resp.status != 200 or resp.body is None:
                if (
                    len(callers) > 1
                    and 400 <= resp.status < 500
                    and resp.status not in _SAME_FOR_EVERY_MEMBER
                ):
                    # maybe one member's input: nobody else's request may fail for it
                    self.splits += 1
                    await asyncio.gather(*(self._alone(c) for c in callers))
                    return
                for c in callers:
                    _resolve(c.future, resp)
                return
            for c, part in zip(callers, _split(resp.body, callers), strict=True):
                _resolve(
                    c.future,
                    UpstreamResponse(status=200, headers=resp.headers, body=part, route=resp.route),
                )
        except BaseException as e:
            for c in callers:
                if not c.future.done():
                    c.future.set_exception(e)
            if isinstance(e, asyncio.CancelledError):
                raise

    async def _alone(self, c: _Caller) -> None:
        """Send one member's own request, as if it had never been batched."""
        if c.future.done():
            return  # its client has left (its future was cancelled): nobody to answer
        c.ctx.shared = None  # its answer comes from a call of its own
        try:
            resp = await c.call(c.req)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # this member's failure is its own
            if not c.future.done():
                c.future.set_exception(e)
            return
        if resp.release is not None:
            resp.release()
        _resolve(c.future, resp)


def _resolve(fut: asyncio.Future[UpstreamResponse], resp: UpstreamResponse) -> None:
    if not fut.done():
        fut.set_result(resp)


def _split(raw: bytes, callers: list[_Caller]) -> list[bytes]:
    """Each caller's vectors (re-indexed from 0) and its share of the usage."""
    data = orjson.loads(raw)
    items = sorted(data.get("data") or [], key=lambda d: d.get("index", 0))
    total = openai_tokens(data.get("usage") or {})[0]  # embeddings: input tokens only
    weights = [sum(len(t) for t in c.inputs) or 1 for c in callers]
    shares, given = [], 0
    for i, w in enumerate(weights):
        share = total - given if i == len(weights) - 1 else total * w // sum(weights)
        shares.append(share)
        given += share
    out, offset = [], 0
    for c, share in zip(callers, shares, strict=True):
        mine = []
        for j, item in enumerate(items[offset : offset + len(c.inputs)]):
            mine.append({**item, "index": j})
        offset += len(c.inputs)
        out.append(
            orjson.dumps(
                {
                    **{k: v for k, v in data.items() if k not in ("data", "usage")},
                    "data": mine,
                    "usage": {"prompt_tokens": share, "total_tokens": share},
                }
            )
        )
    return out


# ---- the plugin ----------------------------------------------------------------------------


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
            key = flight_key(fingerprint(ctx, self.config.scope), req)
            if not req.stream:
                return await self.coalescer.send_whole(key, ctx, req, call)
            # a stream is shared live: its call runs in a task of its own, so a disconnecting
            # client (the first one included) never cuts the others' stream
            return await self.coalescer.send(key, ctx, req, call)
        return None
