"""Authenticate a plugin route's caller the way the client endpoints do.

Plugin routes (``register_routes``) are served outside the request chain, so nothing checks
their caller unless the handler asks. An admin route uses ``proxy.admin.admin_only``; a client
route (``GET /v1/responses/{id}``: a user reads what they created) calls ``caller`` with the
request: it runs the live chain's ``authenticate`` hooks on the headers, exactly as for
``POST /v1/chat/completions``, and gives the Principal or raises the same 401 ``Reject``,
which the core renders in the route's error shape. Without an ``authenticate`` hook in the
chain every caller is the anonymous principal, as on the client endpoints.
"""

from __future__ import annotations

from aiohttp import web

from proxy.appkeys import GATEWAY
from proxy.context import Dialect, Principal, RequestContext
from proxy.edge import undecodable_header
from proxy.errors import Reject
from proxy.handler import authenticate, new_request_id, request_dialect


async def caller(request: web.Request, dialect: Dialect | None = None) -> Principal:
    """The Principal of the key ``request`` presents (``Authorization: Bearer`` or
    ``x-api-key``); raises ``Reject`` (401, or 400 for a header that is not UTF-8).

    ``dialect`` (default: the request's, as the core answers a plugin route's errors in)
    is what the authenticate hooks see in ``ctx.dialect``."""
    bad = undecodable_header(request.headers)
    if bad is not None:
        raise Reject(400, f"header {bad} is not valid UTF-8", code="invalid_header")
    rt = request.app[GATEWAY].runtime
    ctx = RequestContext(
        request_id=new_request_id(),
        endpoint="chat",  # read by no authenticate hook; a plugin route has no endpoint
        dialect=dialect or request_dialect(request),
        request=request,
        client_ip=request.remote or "",
    )
    return await authenticate(rt, ctx)
