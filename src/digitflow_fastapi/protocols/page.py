"""The page at `/`: draw or drop digits and see what the model saw and predicted.

Plain HTML, CSS and JavaScript shipped in the package (`static/`): no CDN, no build step. The
page calls the seed route with `?probabilities=true&explain=true`; the model uuid and the
digitflow version are written into the footer when the page is served.
"""

from __future__ import annotations

import html
from functools import lru_cache
from importlib.metadata import version as package_version
from importlib.resources import files

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_PATH = "/static"
router = APIRouter(tags=["page"])


@lru_cache(maxsize=1)
def _template() -> str:
    page = files("digitflow_fastapi.protocols") / "static" / "index.html"
    return page.read_text(encoding="utf-8")


@router.get("/", summary="Try the model in a browser", response_class=HTMLResponse)
async def index(request: Request) -> HTMLResponse:
    """The page: a canvas to draw on, a drop zone for images, the results."""
    settings = request.app.state.settings
    service = request.app.state.service
    uuid = service.model_uuid if service is not None else "not loaded yet"
    page = (
        _template()
        .replace("{{MODEL_UUID}}", html.escape(uuid or "unknown"))
        .replace("{{VERSION}}", html.escape(package_version("digitflow")))
        .replace("{{PREDICT_URL}}", html.escape(f"{settings.API_V1_STR}/model/predict"))
    )
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})


def install_page(app: FastAPI) -> None:
    """Serve the page at `/` and its assets under `/static`."""
    static = files("digitflow_fastapi.protocols") / "static"
    app.mount(STATIC_PATH, StaticFiles(directory=str(static)), name="static")
    app.include_router(router)
