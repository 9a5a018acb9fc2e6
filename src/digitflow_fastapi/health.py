"""Liveness and readiness probes, and the Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from digitflow_fastapi import metrics
from digitflow_fastapi.readiness import Readiness
from digitflow_fastapi.responses import OrjsonResponse
from digitflow_fastapi.schemas import HealthStatus, ReadyStatus

router = APIRouter(tags=["health"])


class PrometheusText(Response):
    """The Prometheus text exposition format."""

    media_type = metrics.CONTENT_TYPE


@router.get("/health", summary="Alive", response_model=HealthStatus)
async def health() -> OrjsonResponse:
    """The process answers HTTP."""
    return OrjsonResponse({"status": "ok"})


@router.get(
    "/ready",
    summary="Model loaded, warmed up and self-tested",
    response_model=ReadyStatus,
    response_model_exclude_none=True,
    responses={503: {"model": ReadyStatus, "description": "Not ready yet or self-test failed"}},
)
async def ready(request: Request) -> OrjsonResponse:
    """200 once the model is loaded, warmed up and reproduced its golden answers; else 503."""
    state: Readiness = request.app.state.readiness
    return OrjsonResponse(state.as_dict(), status_code=200 if state.ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics (all workers)",
    response_class=PrometheusText,
    responses={200: {"content": {metrics.CONTENT_TYPE: {"schema": {"type": "string"}}}}},
)
async def prometheus_metrics(request: Request) -> Response:
    """Request counts by status, images, latency and batch-size histograms, in Prometheus text."""
    folder = request.app.state.settings.DIGITFLOW_METRICS_DIR
    return PrometheusText(metrics.render(folder))
