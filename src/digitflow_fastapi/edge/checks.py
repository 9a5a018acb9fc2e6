"""What the ASGI edge does besides routing, built once from the settings.

Request ids and logs (`request_log`), API keys (`access`), the rate limit (`rate_limit`) and
CORS (`cors`) all run in `asgi.LeanFastAPI.__call__`, ahead of both the fast handlers and
FastAPI's middleware, so every answer (errors and refusals too) gets them; keys and the rate
limit apply to every route but `routing.OPEN_ROUTES`.
"""

from __future__ import annotations

from dataclasses import dataclass

from digitflow_fastapi.config import Settings
from digitflow_fastapi.edge.cors import CorsPolicy
from digitflow_fastapi.edge.keys import KeyChecker
from digitflow_fastapi.edge.rate_limit import RateLimiter
from digitflow_fastapi.edge.settings import parse_rate_limit


@dataclass(frozen=True)
class Edge:
    """The edge's policies; all off by default, except the request log."""

    request_log: bool = True
    keys: KeyChecker | None = None
    limiter: RateLimiter | None = None
    cors: CorsPolicy | None = None

    @property
    def guards(self) -> bool:
        """Whether requests are checked at all (keys or a rate limit configured)."""
        return self.keys is not None or self.limiter is not None

    @classmethod
    def from_settings(cls, settings: Settings) -> Edge:
        keys = settings.api_keys()
        origins = settings.cors_origins()
        limiter = None
        if settings.RATE_LIMIT:
            count, period_s = parse_rate_limit(settings.RATE_LIMIT)
            limiter = RateLimiter(count, period_s, settings.RATE_LIMIT_MAX_CLIENTS)
        return cls(
            request_log=settings.REQUEST_LOG,
            keys=KeyChecker(keys) if keys else None,
            limiter=limiter,
            cors=CorsPolicy(origins, settings.CORS_ALLOW_CREDENTIALS) if origins else None,
        )
