"""Inputs shared by the v2 and MLflow routes: a capped body, images and pixel tensors → a batch.

Both routes reach the model the way the seed route does: the same image decoder and preprocess
(`digitflow.inference.preprocess` via the worker's `decoding.ImageDecoder`), the same size caps
and the same per-worker batcher.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
from starlette.requests import Request

from digitflow.inference.classifier import Prediction
from digitflow_fastapi.deps import get_app_settings, get_service
from digitflow_fastapi.edge.body_cap import check_received_bytes
from digitflow_fastapi.errors import RequestError
from digitflow_fastapi.protocols.decoding import ImageDecoder
from digitflow_fastapi.protocols.predicting import predict_images

FloatBatch = npt.NDArray[np.float32]

# A JSON string (escapes skipped) or one byte that starts a value: a comma, `[` or `{`.
_STRING_OR_VALUE_MARK = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[,\[{]')


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused with 413 as soon as it grows past `max_bytes` (chunked too)."""
    received = bytearray()
    async for chunk in request.stream():
        received += chunk
        check_received_bytes(len(received), max_bytes)
    return bytes(received)


def check_json_values(text: bytes, max_values: int, setting: str) -> None:
    """Refuse JSON holding more than `max_values` values before it is parsed (413).

    Parsed JSON costs far more than its text: `{},` is a 72-byte dict, so 10 MiB of `[{},...]`
    grew a worker by 241 MiB. Every value but the first of a list or object follows a comma and
    every list or object opens with `[` or `{`, so counting those bytes bounds the values. The
    count over the raw bytes (a memchr pass each) settles any ordinary request; only a document
    over the cap by it is rescanned with its strings skipped (a comma in a string is no value),
    stopping as soon as the cap is passed.
    """
    if text.count(b",") + text.count(b"[") + text.count(b"{") <= max_values:
        return
    count = 0
    for match in _STRING_OR_VALUE_MARK.finditer(text):
        if match.end() - match.start() == 1:  # not a string, which is at least `""`
            count += 1
            if count > max_values:
                raise RequestError(
                    413,
                    f"the request's JSON holds more than {max_values} values ({setting}); "
                    "send the images' bytes as binary tensor data or fewer images",
                )


def check_count(count: int, max_images: int) -> None:
    """At least one image and at most MAX_FILES_PER_REQUEST, as on the seed route."""
    if count == 0:
        raise RequestError(400, "no images in the request")
    if count > max_images:
        raise RequestError(
            413, f"{count} images in one request; at most {max_images} (MAX_FILES_PER_REQUEST)"
        )


def decode_base64(text: object, label: str) -> bytes:
    """Strict base64 (standard alphabet, padding optional) → bytes, or a 400 naming `label`."""
    if not isinstance(text, str):
        raise RequestError(400, f"{label}: expected a base64 string, got {type(text).__name__}")
    cleaned = "".join(text.split())
    try:
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{label}: not valid base64") from None


async def images_to_batch(
    decoder: ImageDecoder, blobs: Sequence[bytes], label_of: Callable[[int], str]
) -> FloatBatch:
    """Encoded images → N×28×28 float32 through the worker's decoder; errors name the image."""
    return await decoder.decode_all(blobs, label_of)


def pixels_to_batch(values: npt.ArrayLike, label: str) -> FloatBatch:
    """Numbers already in the model's input space → N×28×28 float32, checked.

    Accepts N×28×28, N×1×28×28 or N×784 (and one 28×28 image); values must be finite and in
    [0, 1] (MNIST layout: light digit on a dark background).
    """
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise RequestError(400, f"{label}: not a numeric array ({exc})") from None
    if array.ndim == 2 and array.shape == (28, 28):
        array = array[np.newaxis]
    shape = tuple(array.shape)
    valid = (
        (array.ndim == 3 and shape[1:] == (28, 28))
        or (array.ndim == 4 and shape[1:] == (1, 28, 28))
        or (array.ndim == 2 and shape[1] == 784)
    )
    if not valid:
        raise RequestError(
            400, f"{label}: shape {list(shape)} is not [N,28,28], [N,1,28,28] or [N,784]"
        )
    if not np.isfinite(array).all():
        raise RequestError(400, f"{label}: contains NaN or infinity")
    if array.size and (array.min() < 0.0 or array.max() > 1.0):
        raise RequestError(400, f"{label}: values must be in [0, 1] (scale 0–255 pixels by 1/255)")
    return np.ascontiguousarray(array.reshape(-1, 28, 28))


async def predict_batch(request: Request, batch: FloatBatch) -> list[Prediction]:
    """One request's images through this worker's micro-batcher (503 before it is loaded)."""
    service = await get_service(request)
    settings = await get_app_settings(request)
    check_count(len(batch), settings.MAX_FILES_PER_REQUEST)
    return await predict_images(service, batch)
