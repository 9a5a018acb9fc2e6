"""Liveness and readiness probes, and the Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from digitflow_fastapi import metrics
from digitflow_fastapi.edge.keys import KeyChecker, presented_key
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
    summary="Model loaded, warmed up and self-tested (details with a key, when keys are set)",
    response_model=ReadyStatus,
    response_model_exclude_none=True,
    responses={503: {"model": ReadyStatus, "description": "Not ready yet or self-test failed"}},
)
async def ready(request: Request) -> OrjsonResponse:
    """200 once the model is loaded, warmed up and reproduced its golden answers; else 503.

    Open to probes. With API keys set, a request without a valid key gets only `ready` and
    `model_uuid`; the details (self-test, swap refusals and their reasons) need a key.
    """
    state: Readiness = request.app.state.readiness
    body = state.as_dict() if _may_see_details(request) else state.probe_view()
    return OrjsonResponse(body, status_code=200 if state.ready else 503)


def _may_see_details(request: Request) -> bool:
    edge = getattr(request.app, "edge", None)
    keys: KeyChecker | None = getattr(edge, "keys", None)
    if keys is None:
        return True  # no keys: every route is open anyway
    key = presented_key({name: value for name, value in request.scope["headers"]})
    return key is not None and keys.matches(key)


@router.get(
    "/metrics",
    summary="Prometheus metrics (all workers)",
    response_class=PrometheusText,
    responses={200: {"content": {metrics.CONTENT_TYPE: {"schema": {"type": "string"}}}}},
)
async def prometheus_metrics(request: Request) -> Response:
    """Request counts by status, images, latency and batch-size histograms, in Prometheus text."""
    folder = request.app.state.handoff.DIGITFLOW_METRICS_DIR
    return PrometheusText(metrics.render(folder))
