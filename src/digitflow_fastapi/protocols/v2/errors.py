"""The protocol's error body `{"error": ...}` for everything under `/v2`, routed or not.

Open Inference Protocol clients (tritonclient, KServe's) read `error` from any non-200 answer; a
FastAPI `{"detail": ...}` makes them fail with a KeyError message instead of the server's reason.
So the router's own 404 (no route) and 405 (known path, other method) under `/v2` are answered
in the protocol's shape too; `digitflow_fastapi.errors` calls `oip_http_error` for those paths.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import Scope

from digitflow_fastapi.responses import OrjsonResponse

logger = logging.getLogger(__name__)

OIP_PREFIX = "/v2"
_SERVED = "the protocol's health, server and model metadata, model ready and infer endpoints"


def oip_error(status: int, message: str, headers: dict[str, str] | None = None) -> OrjsonResponse:
    """The protocol's error body."""
    return OrjsonResponse({"error": message}, status_code=status, headers=headers)


def route_path(scope: Scope) -> str:
    """The path as the router matches it: without the `root_path` a proxy mounted us under."""
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", ""))
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :]
    return path


def is_oip_path(scope: Scope) -> bool:
    """Whether the request is under `/v2` (the protocol's tree), `root_path` stripped."""
    path = route_path(scope)
    return path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/")


def oip_http_error(request: Request, exc: HTTPException) -> OrjsonResponse:
    """The router's 404/405 (or another HTTP error) under `/v2` as `{"error": ...}`."""
    path = route_path(request.scope)[:200]
    method = request.method
    if exc.status_code == 404:
        message = f"{method} {path} is not an endpoint of this server; it serves {_SERVED}"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"method {method} is not allowed on {path}; allowed: {allowed}"
    else:
        message = str(exc.detail)
    return oip_error(exc.status_code, message, dict(exc.headers) if exc.headers else None)
