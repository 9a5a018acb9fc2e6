"""Liveness and readiness probes, and the Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from digitflow_fastapi import metrics
from digitflow_fastapi.readiness import Readiness
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
    state: Readiness = request.app.state.readiness
    return OrjsonResponse(state.as_dict(), status_code=200 if state.ready else 503)


@router.get("/metrics", summary="Prometheus metrics (all workers)")
async def prometheus_metrics(request: Request) -> Response:
    """Request counts by status, images, latency and batch-size histograms, in Prometheus text."""
    folder = request.app.state.settings.DIGITFLOW_METRICS_DIR
    return Response(metrics.render(folder), media_type=metrics.CONTENT_TYPE)
