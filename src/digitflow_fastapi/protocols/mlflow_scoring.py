"""MLflow's scoring-server protocol (`/ping`, `/version`, `/invocations`) over the same batcher.

So `mlflow models predict`-style clients and MLflow's `ScoringServerClient` work unchanged. A
request carries images as base64 strings (or `{"b64": ...}` objects, TF-serving style) or as
pixel arrays already in the model's input space ([N,28,28], [N,1,28,28] or [N,784] in [0, 1]):

* `{"inputs": [...]}` or `{"inputs": {"image": [...]}}` (one named column),
* `{"instances": [...]}` (one image per instance),
* `{"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}`,
* `{"dataframe_records": [{"image": "<base64>"}, ...]}`.

Answers `{"predictions": [{"prediction": 7, "probabilities": [...]}, ...]}`; errors carry MLflow's
`error_code` and `message` plus the project's `detail`.
"""

from __future__ import annotations

from importlib.metadata import version as package_version
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import PlainTextResponse, Response

from digitflow_fastapi.deps import get_app_settings
from digitflow_fastapi.edge.routing import served_fast
from digitflow_fastapi.errors import RequestError
from digitflow_fastapi.protocols.decoding import ImageDecoder
from digitflow_fastapi.protocols.model_inputs import (
    FloatBatch,
    check_count,
    decode_base64,
    images_to_batch,
    pixels_to_batch,
    predict_batch,
    read_body,
)
from digitflow_fastapi.responses import OrjsonResponse
from digitflow_fastapi.schemas import MlflowError, MlflowPredictions

router = APIRouter(tags=["mlflow scoring protocol"])

INVOCATIONS = "/invocations"
IMAGE_COLUMNS = ("image", "images", "image_b64")
FORMATS = ("inputs", "instances", "dataframe_split", "dataframe_records")

_ERROR_CODES = {
    400: "BAD_REQUEST",
    413: "BAD_REQUEST",
    415: "BAD_REQUEST",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": MlflowError, "description": "Malformed JSON, unknown format, bad image"},
    413: {"model": MlflowError, "description": "Body or image count over the limits"},
    415: {"model": MlflowError, "description": "Not application/json, or not an image"},
    503: {"model": MlflowError, "description": "Model not loaded yet"},
}
_EXAMPLE_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGP4DwABAQEAVhJHKwAAAABJRU5ErkJggg=="
)
_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {"type": "object"},
            "examples": {
                "dataframe_split": {
                    "summary": "A column of base64 images (pandas split orient)",
                    "value": {"dataframe_split": {"columns": ["image"], "data": [[_EXAMPLE_B64]]}},
                },
                "instances": {
                    "summary": "Instances: base64 images",
                    "value": {"instances": [{"b64": _EXAMPLE_B64}]},
                },
                "inputs": {
                    "summary": "Inputs: 28×28 pixel arrays in [0, 1] (here blank)",
                    "value": {"inputs": [[[0.0] * 28] * 28]},
                },
            },
        }
    },
}


def mlflow_error(exc: RequestError) -> OrjsonResponse:
    """MLflow's error body (`error_code`, `message`) with the project's `detail`."""
    code = _ERROR_CODES.get(exc.status_code, "BAD_REQUEST")
    body = {"error_code": code, "message": exc.detail, "detail": exc.detail}
    return OrjsonResponse(body, status_code=exc.status_code, headers=exc.headers)


@router.get(
    "/ping",
    summary="MLflow health check",
    response_class=PlainTextResponse,
    responses={
        200: {"content": {"text/plain": {"example": "\n"}}},
        503: {"description": "Model not loaded yet"},
    },
)
async def ping(request: Request) -> Response:
    """200 with an empty line once the model is loaded (as MLflow's server); 503 before."""
    ready = bool(request.app.state.readiness.ready)
    return PlainTextResponse("\n", status_code=200 if ready else 503)


@router.get(
    "/version",
    summary="Server version (MLflow-style)",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"example": "0.1.0"}}}},
)
async def version() -> Response:
    """The digitflow version, as plain text (MLflow's server answers its own version here)."""
    return PlainTextResponse(package_version("digitflow"))


async def invocations_lean(request: Request) -> Response:
    """`/invocations` without FastAPI's dependency layer; every client error is a 4xx."""
    try:
        settings = await get_app_settings(request)
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise RequestError(
                415, f"Content-Type must be application/json, not {content_type[:60]!r}"
            )
        body = await read_body(request, settings.MAX_UPLOAD_BYTES)
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise RequestError(400, f"the request is not valid JSON: {exc}") from None
        batch = await _batch(document, settings.MAX_FILES_PER_REQUEST, request.app.state.decoder)
        predictions = await predict_batch(request, batch)
    except RequestError as exc:
        return mlflow_error(exc)
    return OrjsonResponse(
        {
            "predictions": [
                {"prediction": p.label, "probabilities": list(p.probabilities)} for p in predictions
            ]
        }
    )


@router.post(
    INVOCATIONS,
    summary="MLflow scoring: predict",
    response_model=MlflowPredictions,
    responses={
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "predictions": [
                            {
                                "prediction": 7,
                                "probabilities": [0, 0, 0.001, 0.002, 0, 0, 0, 0.995, 0, 0.002],
                            }
                        ]
                    }
                }
            }
        },
        **_ERRORS,
    },
    openapi_extra={"requestBody": _REQUEST_BODY},
)
@served_fast(invocations_lean)
async def invocations(request: Request) -> Response:
    """Predict the digit of each image in any of MLflow's JSON input formats.

    The edge answers it with `invocations_lean` (`routing.served_fast`), like the seed's route.
    """
    return await invocations_lean(request)


async def _batch(document: Any, max_images: int, decoder: ImageDecoder) -> FloatBatch:
    """The images of any accepted format as N×28×28 float32."""
    if not isinstance(document, dict):
        raise RequestError(400, f"the request must be a JSON object with one of {list(FORMATS)}")
    present = [key for key in FORMATS if key in document]
    if len(present) != 1:
        raise RequestError(400, f"send exactly one of {list(FORMATS)}; got {sorted(document)[:8]}")
    key = present[0]
    value = document[key]
    if key == "dataframe_split":
        items = _split_column(value)
    elif key == "dataframe_records":
        items = _records_column(value)
    elif key == "inputs" and isinstance(value, dict):
        items = _named_column(value, "inputs")
    else:
        items = value
    if not isinstance(items, list):
        raise RequestError(400, f"{key}: expected a list of images")
    check_count(len(items), max_images)
    if all(_is_image(item) for item in items):
        blobs = [
            decode_base64(item["b64"] if isinstance(item, dict) else item, f"{key}[{i}]")
            for i, item in enumerate(items)
        ]
        return await images_to_batch(decoder, blobs, lambda i: f"{key}[{i}]")
    if any(_is_image(item) for item in items):
        raise RequestError(400, f"{key}: mixes base64 images and pixel arrays")
    return pixels_to_batch(items, key)


def _is_image(item: Any) -> bool:
    return isinstance(item, str) or (isinstance(item, dict) and set(item) == {"b64"})


def _pick_column(columns: list[Any], where: str) -> int:
    if len(columns) == 1:
        return 0
    for name in IMAGE_COLUMNS:
        if name in columns:
            return columns.index(name)
    raise RequestError(400, f"{where}: send one column, or one named {' / '.join(IMAGE_COLUMNS)}")


def _split_column(value: Any) -> list[Any]:
    """`dataframe_split`: the image column of each row."""
    if not isinstance(value, dict) or not isinstance(value.get("data"), list):
        raise RequestError(400, "dataframe_split: expected {'columns': [...], 'data': [[...]]}")
    rows = value["data"]
    columns = value.get("columns") or ["image"]
    if not isinstance(columns, list):
        raise RequestError(400, "dataframe_split: `columns` must be a list")
    index = _pick_column(columns, "dataframe_split")
    items = []
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(columns):
            raise RequestError(400, f"dataframe_split: row {i} does not have {len(columns)} values")
        items.append(row[index])
    return items


def _records_column(value: Any) -> list[Any]:
    """`dataframe_records`: the image field of each record."""
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise RequestError(400, "dataframe_records: expected a list of objects")
    if not value:
        return []
    column = list(value[0])[_pick_column(list(value[0]), "dataframe_records")]
    try:
        return [record[column] for record in value]
    except KeyError:
        raise RequestError(400, f"dataframe_records: a record has no {column!r}") from None


def _named_column(value: dict[str, Any], where: str) -> list[Any]:
    """`{"inputs": {"image": [...]}}`: the one named column (MLflow's dict-of-arrays form)."""
    names = list(value)
    column = names[_pick_column(names, where)] if names else None
    items = value.get(column) if column is not None else None
    if not isinstance(items, list):
        raise RequestError(400, f"{where}: expected a list under {column!r}")
    return items
