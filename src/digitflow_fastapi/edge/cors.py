"""CORS answered at the ASGI edge, so the lean predict path gets it too (`CORS_ORIGINS`).

Starlette's `CORSMiddleware` sits behind the lean path and would never see a predict request.
Only listed origins get `Access-Control-Allow-Origin` (their own origin, echoed, with
`Vary: Origin`); with `*` any origin gets `*`, and credentials are never allowed with `*` (the
settings refuse that combination). A preflight from an unlisted origin gets 400 with no allow
header; a request from one is served without CORS headers, so the browser withholds the answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from starlette.responses import Response

from digitflow_fastapi.responses import OrjsonResponse

Headers = list[tuple[bytes, bytes]]

ALLOWED_METHODS = b"GET, POST, OPTIONS"
ALLOWED_HEADERS = b"Authorization, Content-Type, X-API-Key, X-Request-ID, " + (
    b"Inference-Header-Content-Length"
)
EXPOSED_HEADERS = b"X-Request-ID, Retry-After, Inference-Header-Content-Length"
PREFLIGHT_MAX_AGE_S = b"600"


class CorsPolicy:
    """The allowed origins and whether credentials (cookies, auth) may be sent along."""

    def __init__(self, origins: Iterable[str], allow_credentials: bool) -> None:
        listed = tuple(origins)
        self.any_origin = "*" in listed
        if self.any_origin and allow_credentials:
            raise ValueError("CORS: '*' cannot be combined with credentials")
        self.origins = frozenset(origin.encode("ascii") for origin in listed if origin != "*")
        self.allow_credentials = allow_credentials

    def _allow_origin(self, origin: bytes) -> bytes | None:
        if origin.lower() in self.origins:
            return origin
        return b"*" if self.any_origin else None

    def response_headers(self, origin: bytes) -> Headers:
        """Headers for an actual (non-preflight) request from `origin`; none if not allowed."""
        allowed = self._allow_origin(origin)
        if allowed is None:
            return [(b"vary", b"Origin")] if self.origins else []
        headers = [
            (b"access-control-allow-origin", allowed),
            (b"access-control-expose-headers", EXPOSED_HEADERS),
        ]
        if allowed != b"*":
            headers.append((b"vary", b"Origin"))
        if self.allow_credentials:
            headers.append((b"access-control-allow-credentials", b"true"))
        return headers

    def preflight(self, origin: bytes, request_headers: Mapping[bytes, bytes]) -> Response:
        """The answer to an `OPTIONS` preflight: 204 with the allow headers, or 400 without."""
        allowed = self._allow_origin(origin)
        if allowed is None:
            response = OrjsonResponse({"detail": "this origin is not allowed (CORS_ORIGINS)"}, 400)
            response.headers["Vary"] = "Origin"
            return response
        method = request_headers.get(b"access-control-request-method", b"")
        if method.upper() not in (b"GET", b"POST", b"HEAD", b"OPTIONS"):
            return OrjsonResponse({"detail": "this method is not allowed (CORS)"}, 400)
        headers = {
            "Access-Control-Allow-Origin": allowed.decode("latin-1"),
            "Access-Control-Allow-Methods": ALLOWED_METHODS.decode(),
            "Access-Control-Allow-Headers": ALLOWED_HEADERS.decode(),
            "Access-Control-Max-Age": PREFLIGHT_MAX_AGE_S.decode(),
        }
        if allowed != b"*":
            headers["Vary"] = "Origin"
        if self.allow_credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return Response(status_code=204, headers=headers)
