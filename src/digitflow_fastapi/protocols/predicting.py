"""One request's images through the worker's micro-batcher, for every route.

Maps the batcher's backpressure to HTTP (a full queue: 503 with `Retry-After`; unanswered past
`REQUEST_TIMEOUT_MS`: 504) and counts what was predicted.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from digitflow.inference.classifier import Prediction
from digitflow.inference.microbatch import QueueFull, QueueTimeout
from digitflow_fastapi import metrics
from digitflow_fastapi.deps import ModelService
from digitflow_fastapi.edge.request_log import note_predictions
from digitflow_fastapi.errors import RequestError
from digitflow_fastapi.protocols.decoding import DeferredBatch


async def predict_images(
    service: ModelService, images: npt.NDArray[np.float32] | DeferredBatch
) -> list[Prediction]:
    """Predictions for `images` (N×28×28 float32, or decoded when their batch runs), or a
    503/504 `RequestError` (or the one a deferred image's decoding raises)."""
    model_uuid = service.model_uuid  # read with `service.batcher` below: the model that answers
    batcher = service.batcher
    try:
        if isinstance(images, DeferredBatch):
            predictions = await batcher.predict_deferred(images.count, images.decode)
        else:
            predictions = await batcher.predict(images)
    except QueueFull as exc:
        detail = f"this worker's batch queue is full: {exc} (MAX_QUEUED_IMAGES_PER_WORKER); retry"
        raise RequestError(503, detail, {"Retry-After": "1"}) from None
    except QueueTimeout as exc:
        raise RequestError(
            504, f"the model did not answer in time: {exc} (REQUEST_TIMEOUT_MS)"
        ) from None
    metrics.METRICS.observe_predictions(predictions)
    note_predictions((p.label for p in predictions), model_uuid)
    return predictions
