"""ASGI layers in front of FastAPI: the body-size cap and the lean path for hot endpoints.

`LeanFastAPI` is a FastAPI app whose hot endpoints (the predict route) are answered straight
from the ASGI scope, ahead of Starlette's middleware and router: measured under load, those
layers cost more CPU than decoding the image. Everything else (docs, health, version, the
documented twin of each hot route in the OpenAPI schema) is plain FastAPI.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from fastapi import FastAPI
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from digitflow_fastapi import metrics
from digitflow_fastapi.errors import RequestError, error_response
from digitflow_fastapi.responses import OrjsonResponse

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Endpoint = Callable[[Request], Awaitable[Response]]

CLIENT_CLOSED_REQUEST = 499


def _declared_length_problem(scope: Scope, max_bytes: int) -> OrjsonResponse | None:
    """A 413/400 answer when the declared Content-Length is over the cap or invalid."""
    for name, value in scope.get("headers", ()):
        if name != b"content-length":
            continue
        try:
            length = int(value)
        except ValueError:
            length = -1
        if length < 0:
            response = OrjsonResponse({"detail": "invalid Content-Length header"}, 400)
        elif length > max_bytes:
            detail = (
                f"request body of {value.decode('latin-1')[:20]} bytes exceeds "
                f"MAX_UPLOAD_BYTES ({max_bytes})"
            )
            response = OrjsonResponse({"detail": detail}, 413)
        else:
            return None
        response.headers["Connection"] = "close"
        return response
    return None


def overloaded_response(limit: int) -> OrjsonResponse:
    """503 with `Retry-After` for a worker already holding `limit` requests."""
    detail = f"this worker is busy with {limit} requests (MAX_IN_FLIGHT_PER_WORKER); retry"
    # No `Connection: close`: closing with the body unread makes the kernel reset the connection
    # and the client sees a reset instead of this answer; uvicorn discards the unread body.
    headers = {"Retry-After": "1"}
    return OrjsonResponse({"detail": detail}, status_code=503, headers=headers)


class LeanFastAPI(FastAPI):
    """FastAPI with a body-size cap in front and hot POST endpoints served without middleware."""

    def __init__(
        self,
        hot_posts: Mapping[str, Endpoint],
        max_body_bytes: int,
        max_in_flight: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.hot_posts = dict(hot_posts)
        self.max_body_bytes = max_body_bytes
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = _declared_length_problem(scope, self.max_body_bytes)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
            endpoint = self.hot_posts.get(scope["path"]) if scope["method"] == "POST" else None
            if endpoint is not None:
                scope["app"] = self
                await self._answer(endpoint, scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def _answer(self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        if self.in_flight >= self.max_in_flight:
            # Refused before the body is read: waiting would only grow everyone's latency.
            response = overloaded_response(self.max_in_flight)
            await response(scope, receive, send)
            metrics.METRICS.observe_request(503, time.perf_counter() - started)
            return
        self.in_flight += 1
        try:
            await self._run(endpoint, scope, receive, send, started)
        finally:
            self.in_flight -= 1

    async def _run(
        self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send, started: float
    ) -> None:
        try:
            response = await endpoint(Request(scope, receive))
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
