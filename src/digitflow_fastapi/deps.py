"""Request dependencies: the settings and the per-worker model service."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from digitflow.microbatch import MicroBatcher
from digitflow_fastapi.config import Settings


@dataclass
class ModelService:
    """What a worker loaded at start-up."""

    batcher: MicroBatcher
    model_uuid: str


def get_service(request: Request) -> ModelService:
    service: ModelService | None = request.app.state.service
    if service is None:
        from digitflow_fastapi.errors import RequestError

        raise RequestError(503, "model is not loaded yet")
    return service


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings
