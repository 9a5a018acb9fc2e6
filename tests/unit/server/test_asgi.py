"""The ASGI layer in front of FastAPI, in-process: hot path, body cap, unexpected errors."""

from __future__ import annotations

import asyncio
import gc
import io
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
import numpy as np
import numpy.typing as npt
from PIL import Image

from digitflow.inference.classifier import Classifier, Prediction
from digitflow.training.net import Net
from digitflow_fastapi.app import YOUNG_GENERATION_THRESHOLD, create_app
from digitflow_fastapi.config import Settings

PREDICT = "/api/v1/model/predict"


class _Broken(Classifier):
    def predict(self, batch: npt.NDArray[np.float32]) -> list[Prediction]:
        raise RuntimeError("boom")


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (28, 28), 0).save(buf, format="PNG")
    return buf.getvalue()


T = TypeVar("T")


def with_client(use: Callable[[httpx.AsyncClient], Awaitable[T]]) -> T:
    """Run `use` against the app in-process, inside its lifespan (model "loaded")."""
    settings = Settings(MAX_UPLOAD_BYTES=10_000)
    app = create_app(settings, classifier=_Broken(Net()))

    async def run() -> T:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return await use(client)

    return asyncio.run(run())


def test_an_unexpected_error_on_the_hot_path_is_a_json_500_and_the_app_keeps_answering() -> None:
    async def use(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        first = await client.post(PREDICT, files={"image_file": ("a.png", _png())})
        return first, await client.get("/health")

    r, health = with_client(use)
    assert r.status_code == 500
    assert r.json() == {"detail": "internal server error"}
    assert health.status_code == 200


def test_client_errors_on_the_hot_path_keep_their_status() -> None:
    r = with_client(lambda c: c.post(PREDICT, files={"wrong": ("a.png", _png())}))
    assert r.status_code == 422
    assert "image_file" in r.json()["detail"]


def test_the_body_cap_covers_every_route() -> None:
    r = with_client(lambda c: c.post("/api/v1/model/version", content=b"x" * 20_000))
    assert r.status_code == 413
    assert "MAX_UPLOAD_BYTES" in r.json()["detail"]


def test_other_methods_on_the_predict_path_go_to_fastapi() -> None:
    assert with_client(lambda c: c.get(PREDICT)).status_code == 405


def test_under_a_route_prefix_as_ray_serve_passes_it_the_model_routes_still_need_a_key() -> None:
    # Ray Serve's proxy hands a replica scope["root_path"] = route_prefix and the full path.
    app = create_app(Settings(API_KEYS="ray-prefix-key-0123456789"), classifier=_Broken(Net()))

    async def run() -> dict[str, int]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, root_path="/digitflow")
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return {
                    path: (await client.request(method, "/digitflow" + path)).status_code
                    for method, path in [
                        ("GET", "/api/v1/model/version"),
                        ("GET", "/metrics"),
                        ("GET", "/v2/models/mnist"),
                        ("POST", PREDICT),
                        ("POST", "/invocations"),
                        ("GET", "/health"),
                    ]
                }

    statuses = asyncio.run(run())
    assert statuses.pop("/health") == 200
    assert set(statuses.values()) == {401}, statuses


def test_start_up_freezes_what_it_loaded_and_lets_requests_in_flight_finish_before_collecting() -> (
    None
):
    saved = gc.get_threshold()
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)  # CPython's defaults
    try:
        assert with_client(lambda c: c.get("/health")).status_code == 200
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (YOUNG_GENERATION_THRESHOLD, 10, 10)
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)
