"""Request dependencies: the settings and the per-worker model service."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from digitflow.inference.microbatch import MicroBatcher
from digitflow_fastapi.config import Settings


@dataclass
class ModelService:
    """The model a worker serves now; `model_swap` replaces both fields when a swap lands."""

    batcher: MicroBatcher
    model_uuid: str


async def get_service(request: Request) -> ModelService:
    """The loaded model service, or 503 before start-up finished.

    `async` on purpose: FastAPI runs a plain `def` dependency in its thread pool (a thread hop
    per request, ~10% of a worker's CPU under load).
    """
    service: ModelService | None = request.app.state.service
    if service is None:
        from digitflow_fastapi.errors import RequestError

        if request.app.state.readiness.self_test == "failed":
            raise RequestError(503, "the model failed its golden self-test; see /ready")
        raise RequestError(503, "model is not loaded yet")
    return service


async def get_app_settings(request: Request) -> Settings:
    """The settings the app was built with (async: no thread-pool hop)."""
    settings: Settings = request.app.state.settings
    return settings
