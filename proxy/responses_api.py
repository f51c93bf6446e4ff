"""The core's part of ``POST /v1/responses``: the provider request, the reply, the stream.

Per route, the Responses API reaches the provider one of two ways (``Route.native_responses``):

- native: an OpenAI provider that serves the Responses API gets the request as it came (the
  model replaced by the upstream model) and its reply goes back as it is; usage is read from
  the reply's ``usage`` (``input_tokens``/``output_tokens``), or in a stream from the
  ``response.completed`` (or ``response.incomplete``) event's ``response.usage``.
- translated: an OpenAI-compatible provider with only chat completions, and every Anthropic
  model, get the request translated to chat (``translate.responses_to_chat_request``, then
  for Anthropic ``chat_to_messages_request``); the reply comes back chat -> Response (messages
  -> chat -> Response for Anthropic), whole or event by event, under a response id the
  gateway makes (``resp_`` + random hex, as OpenAI's ids look).

Nothing here runs for the other endpoints: the handler and the relay test the endpoint once
per request (and pick this stream handling, ``ResponsesEvents``, once per stream), so a chat
request pays a few comparisons for it, never a per-event cost.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import orjson

from proxy import sse, translate
from proxy.context import StashKey
from proxy.errors import TRANSLATION_ERRORS, Reject, untranslatable_reply
from proxy.tokens import Tokens, anthropic_tokens, openai_tokens, responses_tokens

if TYPE_CHECKING:
    from proxy.chain import Chain
    from proxy.context import RequestContext, Route

_DONE_EVENTS = frozenset({"response.completed", "response.incomplete"})
_FAILED_EVENTS = frozenset({"response.failed", "error"})
TERMINAL_FRAMES = (b"event: response.completed", b"event: response.incomplete")
"""The last event of a Responses stream, as the relay holds it back until ``response_complete``
ran (as it does chat's ``[DONE]`` and Anthropic's ``message_stop``)."""


COUNT_OBJECT = "response.input_tokens"
"""The ``object`` of a ``POST /v1/responses/input_tokens`` reply (``proxy.input_tokens``)."""


def count_reply(tokens: int) -> dict[str, Any]:
    """A token count in the Responses API's shape: ``{"object": "response.input_tokens",
    "input_tokens": N}``, what ``client.responses.input_tokens.count`` parses."""
    return {"object": COUNT_OBJECT, "input_tokens": tokens}


def new_response_id() -> str:
    """``resp_`` + 48 random hex digits: the id of a translated reply (OpenAI's look so)."""
    return "resp_" + os.urandom(24).hex()


REISSUED: StashKey[dict[str, Any]] = StashKey()
"""The Response a request was answered with under an id of its own (``reissue``), when the
reply itself was made for another request: a cache hit, or a follower of a shared provider
call. No provider knows that id, so a plugin that keeps Responses records it as kept by the
gateway (``plugins.responses``)."""

CONTINUES: StashKey[str] = StashKey()
"""The ``previous_response_id`` a request continues when a plugin expanded it out of the body
(``plugins.responses``): the reply still names it, and a reissued reply names this one rather
than whatever the request that made the reply continued."""


def reissue(
    ctx: RequestContext, response: dict[str, Any], rid: str | None = None
) -> dict[str, Any]:
    """``response`` under ``rid`` (None: a fresh ``new_response_id``), noted in ``ctx.stash``.

    A reply made for another request (a cache hit, a coalesced follower's) carries that
    request's id: handed on as it is, two users, or two turns of one user, would hold one
    id, and only the first could continue from it. A copy: the stored body stays as stored.
    """
    out = {**response, "id": rid or new_response_id()}
    out["previous_response_id"] = ctx.body.get("previous_response_id") or ctx.stash.get(CONTINUES)
    ctx.stash[REISSUED] = out
    return out


def upstream_body(
    body: dict[str, Any], route: Route, default_max_tokens: int
) -> tuple[str, dict[str, Any]]:
    """The provider endpoint (what ``ProviderClient.url`` maps) and body for ``route``.

    A request a translated route cannot carry is a 400 naming the field (``param``): a
    hosted tool (``tools[i].type``), a field chat has no equivalent for, one the Anthropic
    step refuses, or a ``previous_response_id`` nothing expanded into ``input`` (the
    ``responses`` plugin does, before this runs); a body of the wrong shape is a 400 too.
    """
    if route.native_responses:
        out = dict(body)
        out["model"] = route.upstream_model
        return "responses", out
    if body.get("previous_response_id") is not None:  # the responses plugin expands it away
        raise _refused(
            route,
            "previous_response_id",
            "the earlier turns are not kept for this model's provider; add the responses "
            "plugin to the chain (it keeps them), or send the earlier turns in input",
        )
    try:
        chat = translate.responses_to_chat_request(body, route.upstream_model)
        if route.kind == "anthropic":
            chat = translate.chat_to_messages_request(
                chat, route.upstream_model, default_max_tokens
            )
    except translate.Unsupported as e:
        raise _refused(route, e.param, e.reason) from None
    except ValueError as e:  # "<field>: <why>", the field first
        param, _, reason = str(e).partition(": ")
        raise _refused(route, param, reason) from None
    except (TypeError, KeyError, AttributeError, IndexError) as e:
        raise Reject(
            400,
            f"the request cannot be translated for this model's provider: {e}",
            code="invalid_request",
        ) from None
    return "chat", chat


def _refused(route: Route, param: str, reason: str) -> Reject:
    return Reject(
        400,
        f"{param!r} cannot be sent to model {route.model!r}, whose provider does not serve "
        f"the Responses API (requests are translated to chat completions): {reason}",
        code="unsupported_parameter",
        param=param,
    )


def whole_reply(
    ctx: RequestContext, route: Route, data: dict[str, Any]
) -> tuple[dict[str, Any], bool]:
    """A whole provider reply as a Response, and whether it changed (a native one does not);
    the usage is read into ``ctx.usage``. A reply that cannot be translated is a 502."""
    usage = data.get("usage")
    if route.native_responses:
        if isinstance(usage, dict):
            _count(ctx, responses_tokens(usage))
        if ctx.shared == "coalesced":  # another request's reply, and so its id
            return reissue(ctx, data), True
        return data, False
    try:
        if isinstance(usage, dict):
            anthropic = route.kind == "anthropic"
            _count(ctx, anthropic_tokens(usage) if anthropic else openai_tokens(usage))
        if route.kind == "anthropic":
            data = translate.messages_response_to_chat(data, ctx.model)
        response = translate.chat_response_to_responses(
            data, ctx.body, new_response_id(), ctx.model, int(time.time())
        )
    except TRANSLATION_ERRORS:
        raise untranslatable_reply() from None
    return response, True


def _count(ctx: RequestContext, tokens: Tokens, final: bool = True) -> None:
    u = ctx.usage
    u.input_tokens, u.output_tokens = tokens
    u.reported = True
    u.final = u.final or final


def _event_type(data: bytes) -> str | None:
    """The ``type`` of an unnamed Responses event (a server that sends no ``event:`` lines);
    OpenAI's events start with it, so only the first bytes are looked at."""
    head = data[:64]
    i = head.find(b'"type":')
    if i < 0:
        return None
    rest = head[i + 7 :].lstrip()
    if not rest.startswith(b'"'):
        return None
    end = rest.find(b'"', 1)
    return rest[1:end].decode() if end > 0 else None


class ResponsesEvents:
    """The relay's stream state for ``/v1/responses`` (mixed into ``relay._StreamState``).

    ``process_responses`` takes the place of ``process`` for these streams: a native stream
    is forwarded event by event (JSON parsed only for its closing event, unless chunk hooks
    ask for every event); a translated one goes through ``to_chat`` (Anthropic) and
    ``to_responses``, whose events the chunk hooks see like any other.
    """

    if not TYPE_CHECKING:  # slots are the relay's; the type checker reads the names below
        __slots__ = ()

    if TYPE_CHECKING:
        chain: Chain
        ctx: RequestContext
        route: Route
        hooks: Any
        ended: bool
        sent_error: bool
        to_chat: translate.MessagesStreamToChat | None
        to_responses: translate.ChatStreamToResponses | None

        def _emit(
            self, data: Any, name: str | None, out: list[bytes], withhold: bool = False
        ) -> None: ...

    @staticmethod
    def responses_translator(ctx: RequestContext, route: Route) -> Any:
        """The chat -> Responses translator of a translated route (None when native)."""
        if route.native_responses:
            return None
        return translate.ChatStreamToResponses(
            ctx.body, new_response_id(), ctx.model, int(time.time())
        )

    def process_responses(self, raw: bytes, out: list[bytes]) -> None:
        """Turn one provider event into zero or more client frames appended to ``out``."""
        name, data = sse.parse_event(raw)
        ctx = self.ctx
        ctx.usage.events += 1
        to_responses = self.to_responses
        if to_responses is None:
            self._native(raw, name, data, out)
            return
        to_chat = self.to_chat
        if to_chat is not None:  # Anthropic: messages events -> chat chunks first
            if name is None and not data:
                return
            if name == "message_stop":
                self.ended = True
            chunks = to_chat.feed(name, orjson.loads(data))  # an error event raises StreamError
        elif data == sse.DONE:
            self.ended = True
            chunks = []
        elif not data:
            return
        else:
            chunks = [orjson.loads(data)]
        emit = self._emit
        for chunk in chunks:
            for ev_name, ev in to_responses.feed(chunk):
                emit(ev, ev_name, out)
        if self.ended:
            for ev_name, ev in to_responses.finish():
                emit(ev, ev_name, out)
        if to_chat is not None:
            _count(ctx, to_chat.usage, name == "message_delta")
        elif to_responses.usage is not None:
            _count(ctx, to_responses.usage)

    def _native(self, raw: bytes, name: str | None, data: bytes, out: list[bytes]) -> None:
        kind = name if name is not None or not data else _event_type(data)
        obj: Any = None
        if kind in _DONE_EVENTS:
            self.ended = True
            obj = orjson.loads(data)
            response = obj.get("response")
            usage = response.get("usage") if isinstance(response, dict) else None
            if isinstance(usage, dict):
                _count(self.ctx, responses_tokens(usage))
        elif kind in _FAILED_EVENTS:
            self.sent_error = True  # the client has the provider's own word on it
        if self.ctx.shared == "coalesced" and data and data != sse.DONE:
            self._emit(self._reissued(obj if obj is not None else orjson.loads(data)), name, out)
        elif self.hooks and data and data != sse.DONE:
            self._emit(obj if obj is not None else orjson.loads(data), name, out)
        else:
            out.append(raw + b"\n\n")

    def _reissued(self, event: Any) -> Any:
        """A follower's event of a shared native stream, its Response under the follower's
        own id (the same id in every event: the first one with a Response draws it)."""
        response = event.get("response") if isinstance(event, dict) else None
        if isinstance(response, dict):
            ctx = self.ctx
            mine = ctx.stash.get(REISSUED)
            event["response"] = reissue(ctx, response, mine["id"] if mine is not None else None)
        return event

    def responses_error(self, message: str, code: str | None) -> bytes:
        """The frames that end a failed stream: a translated one closes its response as
        ``response.failed``; a native one (whose response the gateway never built) gets an
        ``error`` event, both in the shapes OpenAI streams them."""
        to_responses = self.to_responses
        if to_responses is not None:
            events = to_responses.fail(message, code or "server_error")
            return b"".join(sse.frame_json(ev, name) for name, ev in events)
        error = {
            "type": "error",
            "code": code,
            "message": message,
            "param": None,
            "sequence_number": self.ctx.usage.events,
        }
        return sse.frame_json(error, "error")
