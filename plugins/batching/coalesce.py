"""Coalescing (single flight): identical requests in flight at once share one provider call.

Two shapes, because a whole reply and a stream fail differently. A whole reply is fetched inline
by the first request (``Coalescer.send_whole``: no task, no event, so the common case with no
duplicate in flight costs a dict insert) and handed to the duplicates; if that first client
hangs up, the duplicates start over, one of them leading. A stream's call runs in a task of its
own (``Coalescer.send``) that every request for the key, the first included, subscribes to, so
no subscriber's disconnect cuts the others' stream; the call is cancelled only when its last
subscriber left. Followers are marked ``ctx.shared = "coalesced"`` (metering bills them no
provider cost). The key (``flight_key``) carries the tenant scope and the forwarded headers, so
a call is never shared across tenants or provider accounts.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from proxy.context import (
    RequestContext,
    Route,
    UpstreamCall,
    UpstreamRequest,
    UpstreamResponse,
)
from proxy.errors import Reject


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


FlightKey = tuple[bytes, frozenset[tuple[str, str]], bool]
"""What identical requests share: the answer's canonical bytes (``proxy.fingerprint.canonical``,
tenant scope included), the forwarded headers, and whether it is streamed."""


def flight_key(fp: bytes, req: UpstreamRequest) -> FlightKey:
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
