"""Embeddings batching: small embeddings requests merged into one provider call per window.

Requests for the same provider, model and parameters arriving within ``window`` go upstream as
one call with an input array (at most ``max_inputs``), and each caller gets its own vectors and
its share of the usage (by the length of its inputs; the shares add up to the provider's count):
fewer, fuller calls for the many one-sentence requests a search index sends. A merged call that
fails with a client error one member's input may have caused is split: each member is sent again
on its own, so nobody's request fails for another's input.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.context import RequestContext, UpstreamCall, UpstreamRequest, UpstreamResponse
from proxy.fingerprint import Scope, scope_id
from proxy.tokens import openai_tokens

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
