"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from digitflow_fastapi.responses import OrjsonResponse

router = APIRouter(tags=["health"])


@router.get("/health", summary="Alive")
async def health() -> OrjsonResponse:
    """The process answers HTTP."""
    return OrjsonResponse({"status": "ok"})


@router.get(
    "/ready",
    summary="Model loaded, warmed up and self-tested",
    responses={503: {"description": "Not ready yet or the self-test failed"}},
)
async def ready(request: Request) -> OrjsonResponse:
    """200 once the model is loaded, warmed up and reproduced its golden answers; else 503."""
    state: dict[str, Any] = request.app.state.readiness
    return OrjsonResponse(state, status_code=200 if state.get("ready") else 503)
