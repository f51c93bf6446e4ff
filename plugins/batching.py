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

Embeddings batching: requests for the same provider, model, encoding and dimensions arriving
within ``window`` go upstream as one call with an input array (at most ``max_inputs``), and each
caller gets its own vectors and its share of the usage (by the length of its inputs; the shares
add up to the provider's count). A request that cannot be batched passes through untouched.
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

from plugins.fingerprint import Scope, fingerprint
from proxy.appkeys import METRICS
from proxy.context import RequestContext, Route, UpstreamRequest, UpstreamResponse
from proxy.errors import Reject
from proxy.hookspecs import hookimpl
from proxy.policy import Policy, parse_duration

log = logging.getLogger("tollway.batching")


class BatchingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    coalesce: bool = Field(True, description="Share one provider call among identical requests.")
    scope: Scope = Field("user", description="Who may share a call: user, tier or global.")
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

    async def run(self, ctx: RequestContext, req: UpstreamRequest) -> None:
        assert ctx.call_upstream is not None
        resp = None
        try:
            resp = await ctx.call_upstream(req)
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


class Coalescer:
    def __init__(self) -> None:
        self.flights: dict[str, Flight] = {}
        self.whole: dict[str, WholeFlight] = {}
        self.coalesced = 0

    async def send_whole(
        self, key: str, ctx: RequestContext, req: UpstreamRequest
    ) -> UpstreamResponse:
        assert ctx.call_upstream is not None
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
            resp = await ctx.call_upstream(req)
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

    async def send(self, key: str, ctx: RequestContext, req: UpstreamRequest) -> UpstreamResponse:
        flight = self.flights.get(key)
        if flight is None:
            flight = Flight()
            self.flights[key] = flight
            flight.task = asyncio.get_running_loop().create_task(flight.run(ctx, req))
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

    def _forget(self, key: str, flight: Flight) -> None:
        if self.flights.get(key) is flight:
            del self.flights[key]


# ---- embeddings batching -------------------------------------------------------------------


@dataclass(eq=False)
class _Caller:
    inputs: list[str]
    future: asyncio.Future[UpstreamResponse]


@dataclass(eq=False)
class _Batch:
    ctx: RequestContext
    req: UpstreamRequest
    callers: list[_Caller] = field(default_factory=list)
    size: int = 0
    timer: asyncio.TimerHandle | None = None


class Batcher:
    def __init__(self, window: float, max_inputs: int) -> None:
        self.window = window
        self.max_inputs = max_inputs
        self.open: dict[tuple[Any, ...], _Batch] = {}
        self.batched = 0
        self.calls = 0
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
        self, ctx: RequestContext, req: UpstreamRequest, inputs: list[str]
    ) -> UpstreamResponse:
        body = req.body
        key = (
            req.provider,
            req.url,
            body.get("model"),
            body.get("encoding_format"),
            body.get("dimensions"),
        )
        batch = self.open.get(key)
        if batch is not None and batch.size + len(inputs) > self.max_inputs:
            self._flush(key)
            batch = None
        if batch is None:
            batch = _Batch(ctx, req)
            self.open[key] = batch
            batch.timer = asyncio.get_running_loop().call_later(self.window, self._flush, key)
        fut: asyncio.Future[UpstreamResponse] = asyncio.get_running_loop().create_future()
        batch.callers.append(_Caller(inputs, fut))
        batch.size += len(inputs)
        if batch.size >= self.max_inputs:
            self._flush(key)
        if len(batch.callers) > 1:
            ctx.shared = "batched"
        return await asyncio.shield(fut)

    def _flush(self, key: tuple[Any, ...]) -> None:
        batch = self.open.pop(key, None)
        if batch is None:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._call(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, batch: _Batch) -> None:
        callers = batch.callers
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
            assert batch.ctx.call_upstream is not None
            resp = await batch.ctx.call_upstream(req)
            if resp.release is not None:
                resp.release()
            if resp.status != 200 or resp.body is None:
                for c in callers:
                    _resolve(c.future, resp)
                return
            for c, part in zip(callers, _split(resp.body, callers), strict=True):
                _resolve(c.future, UpstreamResponse(status=200, headers=resp.headers, body=part))
        except BaseException as e:
            for c in callers:
                if not c.future.done():
                    c.future.set_exception(e)
            if isinstance(e, asyncio.CancelledError):
                raise


def _resolve(fut: asyncio.Future[UpstreamResponse], resp: UpstreamResponse) -> None:
    if not fut.done():
        fut.set_result(resp)


def _split(raw: bytes, callers: list[_Caller]) -> list[bytes]:
    """Each caller's vectors (re-indexed from 0) and its share of the usage."""
    data = orjson.loads(raw)
    items = sorted(data.get("data") or [], key=lambda d: d.get("index", 0))
    usage = data.get("usage") or {}
    total = int(usage.get("prompt_tokens") or 0)
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
            },
        )
        yield

    @hookimpl
    async def send_upstream(
        self, ctx: RequestContext, req: UpstreamRequest
    ) -> UpstreamResponse | None:
        if ctx.call_upstream is None:
            return None
        if ctx.endpoint == "embeddings" and self.config.embeddings:
            inputs = Batcher.inputs_of(req.body)
            if inputs is not None and len(inputs) < self.config.max_inputs:
                return await self.batcher.send(ctx, req, inputs)
        if self.config.coalesce:
            key = fingerprint(ctx, self.config.scope)
            if not req.stream:
                return await self.coalescer.send_whole(key, ctx, req)
            # a stream is shared live: its call runs in a task of its own, so a disconnecting
            # client (the first one included) never cuts the others' stream
            return await self.coalescer.send(key + ":stream", ctx, req)
        return None
