"""`/api/v1/model/*`: predict digits in uploaded images and report the model's version."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Depends, Query, Request

from digitflow_fastapi.deps import ModelService, get_app_settings, get_service
from digitflow_fastapi.edge.routing import served_fast
from digitflow_fastapi.errors import RequestError
from digitflow_fastapi.protocols.decoding import ImageDecoder
from digitflow_fastapi.protocols.predicting import predict_images
from digitflow_fastapi.protocols.uploads import read_multipart
from digitflow_fastapi.responses import OrjsonResponse
from digitflow_fastapi.schemas import ErrorResponse, ExplainedPredictResponse, VersionResponse

router = APIRouter(prefix="/model", tags=["model"])

FIELD = "image_file"

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Not an image, corrupt, empty or malformed"},
    413: {"model": ErrorResponse, "description": "Body, image or file count over the limits"},
    415: {
        "model": ErrorResponse,
        "description": "Wrong content type or image format",
    },
    422: {"model": ErrorResponse, "description": "No `image_file` part"},
    503: {"model": ErrorResponse, "description": "Model not loaded yet"},
}

_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": [FIELD],
                "properties": {
                    FIELD: {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "One or more PNG, JPEG, WebP, BMP or GIF images",
                    }
                },
            }
        }
    },
}


_TRUE = frozenset({"1", "true", "on", "yes", "y", "t"})
_FALSE = frozenset({"0", "false", "off", "no", "n", "f"})


async def predict_lean(request: Request) -> OrjsonResponse:
    """The predict endpoint without FastAPI's dependency and validation layer."""
    if not request.scope.get("query_string"):
        return await answer_predict(request, False)
    probabilities = query_flag(request, "probabilities")
    return await answer_predict(request, probabilities, explain=query_flag(request, "explain"))


def query_flag(request: Request, name: str) -> bool:
    """A boolean query parameter (FastAPI's spellings); absent is False, anything else is 422."""
    value = request.query_params.get(name)
    if value is None:
        return False
    lowered = value.strip().lower()
    if lowered not in _TRUE and lowered not in _FALSE:
        raise RequestError(422, f"query.{name}: not a boolean: {value[:40]!r}")
    return lowered in _TRUE


@router.post(
    "/predict",
    summary="Predict the digit in each uploaded image",
    response_model=ExplainedPredictResponse,
    response_model_exclude_none=True,
    responses={
        200: {
            "content": {
                "application/json": {
                    "example": {"data": [{"image_filename": "digit.png", "prediction": "7"}]}
                }
            }
        },
        **_ERRORS,
    },
    openapi_extra={"requestBody": _REQUEST_BODY},
)
@served_fast(predict_lean)
async def predict(
    request: Request,
    probabilities: Annotated[
        bool, Query(description="Add each image's class probabilities (0–9)")
    ] = False,
    explain: Annotated[
        bool,
        Query(description="Add each image's `model_input`: the 28×28 grid the model saw (0–1)"),
    ] = False,
) -> OrjsonResponse:
    """One entry per `image_file` part, in order; `prediction` is the digit as a string.

    The edge answers it with `predict_lean` (`routing.served_fast`), skipping FastAPI's
    validation layer (measured faster); mounted elsewhere, this answers the same way.
    """
    return await predict_lean(request)


async def answer_predict(
    request: Request, probabilities: bool, explain: bool = False
) -> OrjsonResponse:
    """Read the upload, decode every image, predict them in one batch, answer the seed's shape."""
    service = await get_service(request)
    settings = await get_app_settings(request)
    parts = await read_multipart(
        request.headers.get("content-type"),
        request.stream(),
        settings.MAX_UPLOAD_BYTES,
        settings.MAX_FILES_PER_REQUEST,
    )
    files = [part for part in parts if part.name == FIELD]
    if not files:
        names = sorted({part.name for part in parts})
        found = f"; got {', '.join(repr(n[:40]) for n in names)}" if names else ""
        raise RequestError(422, f"missing form field {FIELD!r}{found}")
    decoder: ImageDecoder = request.app.state.decoder
    blobs = [bytes(part.data) for part in files]

    def label_of(i: int) -> str:
        return f"{FIELD} #{i + 1} ({(files[i].filename or '')[:100]!r})"

    # With `explain` the inputs are part of the answer: decoded here, not in the batch.
    inputs = await decoder.decode_all(blobs, label_of) if explain else None
    images = inputs if inputs is not None else await decoder.decode_later(blobs, label_of)
    predictions = await predict_images(service, images)
    data: list[dict[str, Any]] = []
    for index, (part, pred) in enumerate(zip(files, predictions, strict=True)):
        item: dict[str, Any] = {
            "image_filename": part.filename or "",
            "prediction": str(pred.label),
        }
        if probabilities:
            item["probabilities"] = list(pred.probabilities)
        if inputs is not None:
            item["model_input"] = model_input_grid(inputs[index])
        data.append(item)
    return OrjsonResponse({"data": data})


def model_input_grid(image: npt.NDArray[np.float32]) -> list[list[float]]:
    """The 28×28 input as rows of floats rounded to 3 places (small JSON, exact enough to draw)."""
    rounded: list[list[float]] = np.round(image.astype(np.float64), 3).tolist()
    return rounded


@router.get(
    "/version",
    summary="The model being served",
    response_model=VersionResponse,
    responses={503: _ERRORS[503]},
)
async def version(service: Annotated[ModelService, Depends(get_service)]) -> OrjsonResponse:
    """The MLflow run UUID of the served model (`PRED_MODEL_UUID`)."""
    return OrjsonResponse({"data": {"model_uuid": service.model_uuid}})
