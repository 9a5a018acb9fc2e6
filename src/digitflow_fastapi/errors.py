"""One place mapping errors to 4xx JSON: `{"detail": ...}`, and `{"error": ...}` under /v2."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from digitflow.errors import ImageTooLarge, InvalidImage, UnsupportedImageFormat
from digitflow_fastapi.protocols.v2.errors import is_oip_path, oip_http_error
from digitflow_fastapi.responses import OrjsonResponse

logger = logging.getLogger(__name__)


class RequestError(Exception):
    """A client error with its HTTP status."""

    def __init__(
        self, status_code: int, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers


def status_for(error: InvalidImage) -> int:
    """HTTP status for an image error."""
    if isinstance(error, UnsupportedImageFormat):
        return 415
    if isinstance(error, ImageTooLarge):
        return 413
    return 400


def error_response(exc: RequestError) -> OrjsonResponse:
    """The JSON answer for a client error: `{"detail": ...}` with its status (both routes)."""
    return OrjsonResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn known errors into JSON 4xx answers."""

    async def on_request_error(request: Request, exc: Exception) -> OrjsonResponse:
        assert isinstance(exc, RequestError)
        return error_response(exc)

    async def on_validation_error(request: Request, exc: Exception) -> OrjsonResponse:
        assert isinstance(exc, RequestValidationError)
        parts = [
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}"
            for err in exc.errors()
        ]
        return OrjsonResponse({"detail": "; ".join(parts)}, status_code=422)

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        # Gone mid-upload: nobody reads the answer; one line, not a traceback (nginx's 499).
        logger.info("client disconnected before the request was read")
        return Response(status_code=499)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        """The router's 404/405: the protocol's body under /v2, FastAPI's elsewhere."""
        assert isinstance(exc, HTTPException)
        if is_oip_path(request.scope):
            return oip_http_error(request, exc)
        return await http_exception_handler(request, exc)

    app.add_exception_handler(RequestError, on_request_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ClientDisconnect, on_client_gone)
