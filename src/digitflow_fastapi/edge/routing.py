"""The app's one route table, as the edge reads it: which route a request reaches, and its policy.

Every route is declared once, on FastAPI's router. The edge (`asgi.LeanFastAPI`) asks this
table which route a request will reach, matching exactly as the router does (the same
`matches` calls, in the same order, so `root_path` is stripped the same way), and decides from
that route's declared path, never from the raw request path:

- **Open** routes answer without a key and are never rate-limited or capped: the probes, the
  docs and the page, named in `OPEN_ROUTES` by their declared paths. Everything else (model
  routes, metadata, metrics, unknown paths, a route added later) is behind the edge.
- **Fast** routes (the model's POST endpoints) are answered by the handler their endpoint was
  marked with (`served_fast`), straight from the edge, without FastAPI's middleware, dependency
  and validation layers: measured under load, those cost more CPU than decoding the image.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi.routing import _IncludedRouter  # what `include_router` adds (FastAPI ≥ 0.160)
from starlette._utils import get_route_path  # the router's own function (memo key)
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match

Scope = MutableMapping[str, Any]
FastHandler = Callable[[Request], Awaitable[Response]]
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])

OPEN_ROUTES: frozenset[str] = frozenset(
    {
        # probes: Kubernetes, KServe (OIP) and MLflow's own
        "/health",
        "/ready",
        "/v2/health/live",
        "/v2/health/ready",
        "/ping",
        # the docs and their schema
        "/docs",
        "/redoc",
        "/openapi.json",
        "/docs-assets",
        # the page (it calls the keyed predict route, so a key is still needed to predict)
        "/",
        "/static",
    }
)
"""The declared paths (route templates, mounts without a trailing slash) open to everyone."""

_FAST_ATTRIBUTE = "__digitflow_fast_handler__"
_MAX_MEMO = 4096  # distinct (method, path) pairs remembered; past that, matched every time


def served_fast(handler: FastHandler) -> Callable[[Endpoint], Endpoint]:
    """Mark a route's endpoint so the edge answers it with `handler(request)`.

    The endpoint stays the route's declaration (OpenAPI parameters, body, responses) and should
    answer the same way (by calling `handler`) should another app mount its router.
    """

    def mark(endpoint: Endpoint) -> Endpoint:
        setattr(endpoint, _FAST_ATTRIBUTE, handler)
        return endpoint

    return mark


def fast_handler(route: BaseRoute) -> FastHandler | None:
    """The handler a route's endpoint was marked with, if any."""
    handler: FastHandler | None = getattr(getattr(route, "endpoint", None), _FAST_ATTRIBUTE, None)
    return handler


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """What the edge needs to know of the route a request reaches."""

    open: bool
    fast: FastHandler | None
    path_params: dict[str, Any]


KEYED_UNMATCHED = RoutePolicy(open=False, fast=None, path_params={})
"""No route, or a route reached with the wrong method (404/405): behind the edge too."""


class RouteTable:
    """The routes of one app, matched as Starlette's router matches them, memoised by path."""

    def __init__(self, routes: Sequence[BaseRoute]) -> None:
        self._routes = tuple(routes)
        self._memo: dict[tuple[str, str], RoutePolicy] = {}

    @property
    def size(self) -> int:
        """How many routes the table was built from (the app rebuilds it when that changes)."""
        return len(self._routes)

    def policy(self, scope: Scope) -> RoutePolicy:
        """The policy of the route this request reaches (path params included)."""
        key = (scope["method"], get_route_path(scope))
        found = self._memo.get(key)
        if found is None:
            found = self._match(scope)
            if len(self._memo) < _MAX_MEMO:
                self._memo[key] = found
        return found

    def _match(self, scope: Scope) -> RoutePolicy:
        found = selected_route(self._routes, dict(scope))
        if found is None:
            return KEYED_UNMATCHED
        route, path, params = found
        return RoutePolicy(path in OPEN_ROUTES, fast_handler(route), params)


def selected_route(
    routes: Sequence[BaseRoute], scope: Scope
) -> tuple[BaseRoute, str, dict[str, Any]] | None:
    """The route the router will run for `scope`, its declared path and its path params.

    The router's own steps: the first route that fully matches, in order; a router included
    with `include_router` (FastAPI's `_IncludedRouter`) is entered through its own `_match`, as
    the router does when it hands the request on. A partial match (405), a slash redirect or
    nothing at all gives None: no endpoint runs, and the request stays behind the edge.
    """
    for candidate in routes:
        match, child_scope = candidate.matches(scope)
        if match is not Match.FULL:
            continue
        route: BaseRoute | None = candidate
        path = getattr(candidate, "path", "")
        while isinstance(route, _IncludedRouter):
            match, child_scope, route, context = route._match(scope)
            if match is not Match.FULL or route is None:
                return None
            effective = getattr(context, "starlette_route", None) or context
            path = getattr(effective, "path", "") or getattr(route, "path", "")
        if route is None:
            return None
        return route, path, dict(child_scope.get("path_params", {}))
    return None
