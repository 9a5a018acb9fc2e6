"""The one request path: the edge (request ids and logs, CORS, API keys, rate limit, body and
in-flight caps) in front of every route, then the route's fast handler or FastAPI.

Which checks apply is decided by the route the request reaches (`routing.RouteTable`), so a route
added later is behind the edge without anyone listing it; only `routing.OPEN_ROUTES` are open.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from fastapi import FastAPI
from starlette.requests import ClientDisconnect, Request

from digitflow.logging_setup import current_request_id
from digitflow_fastapi import metrics
from digitflow_fastapi.edge.body_budget import budget_of, metered
from digitflow_fastapi.edge.body_cap import check_declared_length
from digitflow_fastapi.edge.checks import Edge
from digitflow_fastapi.edge.keys import presented_key
from digitflow_fastapi.edge.request_log import (
    REQUEST_ID_HEADER,
    RequestIds,
    RequestRecord,
    current_record,
    write_request_line,
)
from digitflow_fastapi.edge.routing import FastHandler, RouteTable
from digitflow_fastapi.errors import RequestError, error_response
from digitflow_fastapi.responses import OrjsonResponse

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = Mapping[bytes, bytes]

CLIENT_CLOSED_REQUEST = 499
_PREFLIGHT_HEADER = b"access-control-request-method"


def _declared_length_problem(value: bytes | None, max_bytes: int) -> OrjsonResponse | None:
    """The 413/400 answer when the declared Content-Length is over the cap or invalid."""
    try:
        check_declared_length(value, max_bytes)
    except RequestError as exc:
        return error_response(exc)
    return None


def overloaded_response(limit: int) -> OrjsonResponse:
    """503 with `Retry-After` for a worker already holding `limit` requests."""
    detail = f"this worker is busy with {limit} requests (MAX_IN_FLIGHT_PER_WORKER); retry"
    # No `Connection: close`: closing with the body unread makes the kernel reset the connection
    # and the client sees a reset instead of this answer; uvicorn discards the unread body.
    headers = {"Retry-After": "1"}
    return OrjsonResponse({"detail": detail}, status_code=503, headers=headers)


class LeanFastAPI(FastAPI):
    """FastAPI with the edge in front of every route and fast routes served without middleware.

    Every HTTP request passes the same checks, in this order, decided by the route it reaches
    (`routing.RouteTable`, matched as the router matches): request id and CORS; then, for every
    route but the open ones, API keys and the rate limit; the declared body size; then, again
    for every route but the open ones, the in-flight cap. Only then is it answered, by the
    route's fast handler or by FastAPI.
    """

    def __init__(
        self,
        max_body_bytes: int,
        max_in_flight: int,
        edge: Edge | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.max_body_bytes = max_body_bytes
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.edge = edge or Edge()
        self.request_ids = RequestIds()
        self._table = RouteTable(())

    def route_table(self) -> RouteTable:
        """The table of the app's routes (rebuilt if a route was added since)."""
        routes = self.router.routes
        if self._table.size != len(routes):
            self._table = RouteTable(routes)
        return self._table

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        started = time.perf_counter()
        headers: Headers = dict(scope["headers"])
        request_id, rejected_id = self.request_ids.take(headers.get(REQUEST_ID_HEADER))
        record = RequestRecord(request_id, rejected_id)
        extra = [(REQUEST_ID_HEADER, request_id.encode("ascii"))]
        preflight = None
        cors = self.edge.cors
        origin = headers.get(b"origin") if cors is not None else None
        if cors is not None and origin is not None:
            if scope["method"] == "OPTIONS" and _PREFLIGHT_HEADER in headers:
                preflight = cors.preflight(origin, headers)
            else:
                extra += cors.response_headers(origin)

        async def send_with_edge_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        id_token = current_request_id.set(request_id)
        record_token = current_record.set(record)
        try:
            # Every body chunk, on every route, is charged to the worker's buffered-body budget.
            with metered(receive, budget_of(self.state)) as receive:
                if preflight is not None:
                    await preflight(scope, receive, send_with_edge_headers)
                else:
                    await self._route(scope, receive, send_with_edge_headers, headers, started)
        finally:
            if self.edge.request_log:
                write_request_line(scope, record, started, self._served_uuid())
            current_record.reset(record_token)
            current_request_id.reset(id_token)

    def _served_uuid(self) -> str | None:
        uuid = getattr(getattr(self.state, "service", None), "model_uuid", None)
        return uuid if isinstance(uuid, str) else None

    def _refusal(self, scope: Scope, headers: Headers) -> OrjsonResponse | None:
        """401/403 (API keys) or 429 (rate limit), else None."""
        edge = self.edge
        key = presented_key(headers)
        if edge.keys is not None:
            refusal = edge.keys.refusal(key)
            if refusal is not None:
                return refusal
        if edge.limiter is None:
            return None
        client = key if edge.keys is not None else (scope.get("client") or ("unknown",))[0]
        return edge.limiter.refusal(client)

    async def _route(
        self, scope: Scope, receive: Receive, send: Send, headers: Headers, started: float
    ) -> None:
        policy = self.route_table().policy(scope)
        refusal = None
        if not policy.open and self.edge.guards:
            refusal = self._refusal(scope, headers)
            if refusal is not None:
                metrics.METRICS.observe_refusal(refusal.status_code)
        if refusal is None:
            refusal = _declared_length_problem(headers.get(b"content-length"), self.max_body_bytes)
        if refusal is not None:
            await refusal(scope, receive, send)
            if policy.fast is not None:  # the request metrics count the model's routes
                metrics.METRICS.observe_request(refusal.status_code, time.perf_counter() - started)
            return
        if policy.open:
            await super().__call__(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            # Refused before the body is read: waiting would only grow everyone's latency.
            response = overloaded_response(self.max_in_flight)
            await response(scope, receive, send)
            if policy.fast is not None:
                metrics.METRICS.observe_request(503, time.perf_counter() - started)
            return
        self.in_flight += 1
        try:
            if policy.fast is not None:
                scope["app"] = self
                scope["path_params"] = dict(policy.path_params)
                await self._answer_fast(policy.fast, scope, receive, send, started)
            else:
                await super().__call__(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _answer_fast(
        self, handler: FastHandler, scope: Scope, receive: Receive, send: Send, started: float
    ) -> None:
        try:
            response = await handler(Request(scope, receive))
        except RequestError as exc:
            response = error_response(exc)
        except ClientDisconnect:
            # Gone mid-upload: nobody to answer. Counted as nginx's 499, no traceback.
            logger.info("client disconnected before the request was read")
            metrics.METRICS.observe_request(CLIENT_CLOSED_REQUEST, time.perf_counter() - started)
            return
        except Exception:
            logger.exception("unhandled error on %r", scope["path"][:200])
            response = OrjsonResponse({"detail": "internal server error"}, status_code=500)
        await response(scope, receive, send)
        metrics.METRICS.observe_request(response.status_code, time.perf_counter() - started)
