"""Open Inference Protocol v2 (KServe / Triton / MLServer clients) over the same batcher.

One model, named by `OIP_MODEL_NAME`, versioned by its run uuid. Inputs (exactly one per request):
`pixels`, FP32 `[-1,1,28,28]` in the model's input space (values in [0, 1], light digit on dark),
or `images`, BYTES `[-1]` of encoded PNG/JPEG/WebP/BMP/GIF files (base64 strings in JSON, raw in
Triton's binary tensor extension). Outputs: `class` (INT64 `[-1]`) and `probabilities` (FP32
`[-1,10]`), as JSON or binary as the request asks. Errors are `{"error": "..."}`.
"""

from __future__ import annotations

from importlib.metadata import version as package_version
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from digitflow_fastapi.deps import get_app_settings, get_service
from digitflow_fastapi.edge.routing import served_fast
from digitflow_fastapi.errors import RequestError
from digitflow_fastapi.protocols.model_inputs import (
    predict_batch,
    read_body,
)
from digitflow_fastapi.protocols.v2 import docs
from digitflow_fastapi.protocols.v2.errors import OIP_PREFIX, oip_error
from digitflow_fastapi.protocols.v2.tensors import (
    CLASS,
    HEADER_LENGTH,
    PROBABILITIES,
    input_batch,
    requested_outputs,
    split_body,
)
from digitflow_fastapi.responses import OrjsonResponse
from digitflow_fastapi.schemas import (
    OipError,
    OipInferResponse,
    OipLive,
    OipModelMetadata,
    OipModelReady,
    OipReady,
    OipServerMetadata,
)

router = APIRouter(prefix=OIP_PREFIX, tags=["open inference protocol v2"])


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": OipError, "description": "Malformed request, unknown input, bad image"},
    404: {"model": OipError, "description": "No model of that name or version"},
    413: {
        "model": OipError,
        "description": "Body, image count or JSON values (MAX_JSON_VALUES) over the limits",
    },
    503: {"model": OipError, "description": "Model not loaded yet"},
}


def _problem(exc: RequestError) -> OrjsonResponse:
    """Client errors are 400 in this protocol, except 404, a body over the cap (413), 503, 504."""
    status = exc.status_code if exc.status_code in (404, 413, 503, 504) else 400
    return oip_error(status, exc.detail, exc.headers)


async def _model_version(request: Request, name: str, version: str | None) -> str:
    """The served run uuid, after checking the name and (when given) the version."""
    settings = await get_app_settings(request)
    if name != settings.OIP_MODEL_NAME:
        raise RequestError(
            404, f"unknown model {name[:64]!r}; this server serves {settings.OIP_MODEL_NAME!r}"
        )
    service = await get_service(request)
    if version not in (None, "", service.model_uuid):
        raise RequestError(
            404, f"model {name!r} has no version {version[:64]!r}; it is {service.model_uuid!r}"
        )
    return service.model_uuid


@router.get("", summary="Server metadata", response_model=OipServerMetadata)
async def server_metadata() -> OrjsonResponse:
    """Name, version and the protocol extensions supported (`binary_tensor_data`)."""
    return OrjsonResponse(
        {
            "name": "digitflow",
            "version": package_version("digitflow"),
            "extensions": ["binary_tensor_data"],
        }
    )


@router.get("/health/live", summary="Server live", response_model=OipLive)
async def server_live() -> OrjsonResponse:
    """200 while the process answers."""
    return OrjsonResponse({"live": True})


@router.get(
    "/health/ready",
    summary="Server ready",
    response_model=OipReady,
    responses={503: {"model": OipReady, "description": "Model not loaded yet"}},
)
async def server_ready(request: Request) -> OrjsonResponse:
    """200 once this worker's model is loaded and self-tested; 503 before."""
    ready = bool(request.app.state.readiness.ready)
    return OrjsonResponse({"ready": ready}, status_code=200 if ready else 503)


async def _metadata(request: Request, name: str, version: str | None) -> OrjsonResponse:
    try:
        uuid = await _model_version(request, name, version)
    except RequestError as exc:
        return _problem(exc)
    return OrjsonResponse(docs.model_metadata(name, uuid))


async def _ready(request: Request, name: str, version: str | None) -> OrjsonResponse:
    try:
        await _model_version(request, name, version)
    except RequestError as exc:
        return _problem(exc)
    ready = bool(request.app.state.readiness.ready)
    return OrjsonResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)


@router.get(
    "/models/{name}",
    summary="Model metadata",
    response_model=OipModelMetadata,
    responses={200: docs.METADATA_EXAMPLE, **_ERRORS},
)
async def model_metadata(request: Request, name: str) -> OrjsonResponse:
    """Inputs `pixels` (FP32 [-1,1,28,28]) or `images` (BYTES [-1]); two outputs."""
    return await _metadata(request, name, None)


@router.get(
    "/models/{name}/versions/{version}",
    summary="Model metadata (one version)",
    response_model=OipModelMetadata,
    responses=_ERRORS,
)
async def model_version_metadata(request: Request, name: str, version: str) -> OrjsonResponse:
    """The same as `/v2/models/{name}`; the only version is the served run uuid."""
    return await _metadata(request, name, version)


@router.get(
    "/models/{name}/ready", summary="Model ready", response_model=OipModelReady, responses=_ERRORS
)
async def model_ready(request: Request, name: str) -> OrjsonResponse:
    """200 when the model is loaded and ready to infer."""
    return await _ready(request, name, None)


@router.get(
    "/models/{name}/versions/{version}/ready",
    summary="Model ready (one version)",
    response_model=OipModelReady,
    responses=_ERRORS,
)
async def model_version_ready(request: Request, name: str, version: str) -> OrjsonResponse:
    """The same as `/v2/models/{name}/ready` for the served run uuid."""
    return await _ready(request, name, version)


async def infer_fast(request: Request) -> Response:
    """Both infer routes as the edge answers them (`routing.served_fast`), path params read here."""
    params = request.path_params
    return await answer_infer(request, params["name"], params.get("version"))


@router.post(
    "/models/{name}/infer",
    summary="Infer (JSON or binary tensors)",
    response_model=OipInferResponse,
    response_model_exclude_none=True,
    responses={200: docs.INFER_RESPONSE_EXAMPLE, **_ERRORS},
    openapi_extra={"requestBody": docs.INFER_REQUEST_BODY},
)
@served_fast(infer_fast)
async def infer(request: Request, name: str) -> Response:
    """Predict a batch: one input, `pixels` or `images`; outputs `class` and `probabilities`."""
    return await answer_infer(request, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Infer (one version)",
    response_model=OipInferResponse,
    response_model_exclude_none=True,
    responses=_ERRORS,
    openapi_extra={"requestBody": docs.INFER_REQUEST_BODY},
)
@served_fast(infer_fast)
async def infer_version(request: Request, name: str, version: str) -> Response:
    """The same as `/v2/models/{name}/infer` for the served run uuid."""
    return await answer_infer(request, name, version)


async def answer_infer(request: Request, name: str, version: str | None) -> Response:
    """Parse, check, predict through the batcher and encode the answer; errors as the protocol."""
    try:
        uuid = await _model_version(request, name, version)
        settings = await get_app_settings(request)
        if request.headers.get("content-encoding", "identity").lower() != "identity":
            raise RequestError(400, "compressed request bodies are not supported")
        body = await read_body(request, settings.MAX_UPLOAD_BYTES)
        document, binary = split_body(
            body, request.headers.get(HEADER_LENGTH), settings.json_values_cap()
        )
        requested = requested_outputs(document)
        batch = await input_batch(document, binary, settings, request.app.state.decoder)
        predictions = await predict_batch(request, batch)
    except RequestError as exc:
        return _problem(exc)
    labels = np.fromiter((p.label for p in predictions), dtype=np.int64, count=len(predictions))
    probabilities = np.asarray([p.probabilities for p in predictions], dtype=np.float32)
    arrays: dict[str, npt.NDArray[Any]] = {CLASS: labels, PROBABILITIES: probabilities}
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for output in requested.names:
        array = arrays[output]
        tensor: dict[str, Any] = {
            "name": output,
            "datatype": "INT64" if output == CLASS else "FP32",
            "shape": list(array.shape),
        }
        if output in requested.binary:
            raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = array.ravel().tolist()
        outputs.append(tensor)
    answer: dict[str, Any] = {"model_name": name, "model_version": uuid, "outputs": outputs}
    if isinstance(document.get("id"), str):
        answer["id"] = document["id"]
    head = orjson.dumps(answer)
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        b"".join([head, *blobs]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
