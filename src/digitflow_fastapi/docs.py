"""`/docs` (Swagger UI) and `/redoc` served from local files, so they work without internet.

FastAPI's default pages load their JavaScript from a CDN and stay blank on an offline host; the
same assets ship in the `fastapi-offline` wheel, which is used here only as a file source.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from digitflow_fastapi.edge.checks import Edge
from digitflow_fastapi.edge.routing import OPEN_ROUTES

ASSETS_PATH = "/docs-assets"


def install_docs(app: FastAPI) -> None:
    """Add `/docs`, `/redoc` and their static assets to an app built with docs_url=None."""
    assets = files("fastapi_offline") / "static"
    app.mount(ASSETS_PATH, StaticFiles(directory=str(assets)), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS_PATH}/favicon.png",
            with_google_fonts=False,
        )


SECURITY_SCHEMES: dict[str, dict[str, str]] = {
    "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "HTTPBearer": {"type": "http", "scheme": "bearer", "description": "the API key as a token"},
}
_ERROR_BODY = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def declare_edge_in_schema(app: FastAPI, edge: Edge) -> None:
    """Document the edge's API keys and rate limit on every operation but the open ones.

    The checks themselves run at the edge (`asgi.LeanFastAPI`) and cost the routes nothing; this
    only declares them, so `/docs` shows the Authorize button and the 401/403/429 answers.
    """
    if not edge.guards:
        return
    build_schema = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build_schema()  # FastAPI's, cached on the app after the first call
        components = schema.setdefault("components", {})
        if edge.keys is not None:
            components.setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
        for path, operations in schema.get("paths", {}).items():
            if path in OPEN_ROUTES:
                continue
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                if edge.keys is not None:
                    operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
                    responses["401"] = {"description": "No API key", "content": _ERROR_BODY}
                    responses["403"] = {"description": "Unknown API key", "content": _ERROR_BODY}
                if edge.limiter is not None:
                    responses["429"] = {
                        "description": "Over RATE_LIMIT (see Retry-After)",
                        "content": _ERROR_BODY,
                    }
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
