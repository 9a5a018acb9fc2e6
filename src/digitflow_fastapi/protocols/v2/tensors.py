"""Reading a v2 inference request: the JSON header, binary tensors, the input and the outputs."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from digitflow_fastapi.config import Settings
from digitflow_fastapi.errors import RequestError
from digitflow_fastapi.protocols.decoding import ImageDecoder
from digitflow_fastapi.protocols.model_inputs import (
    FloatBatch,
    check_count,
    check_json_values,
    decode_base64,
    images_to_batch,
    pixels_to_batch,
)

PIXELS = "pixels"
IMAGES = "images"
CLASS = "class"
PROBABILITIES = "probabilities"
OUTPUTS = (CLASS, PROBABILITIES)
HEADER_LENGTH = "inference-header-content-length"
# ASCII digits only: `str.isdigit` also takes "²" (int() then fails) and int() takes "١٢" and
# "1_0"; 15 digits are past any body the upload cap lets in (and far below int()'s digit limit).
_LENGTH = re.compile(r"[0-9]{1,15}")


@dataclass
class Requested:
    names: tuple[str, ...]
    binary: set[str]


def split_body(
    body: bytes, header_length: str | None, max_values: int
) -> tuple[dict[str, Any], bytes]:
    """The JSON inference header and the binary tensor data after it (may be empty).

    The header is counted before it is parsed (`check_json_values`), so a document of many
    tiny values is refused before it becomes hundreds of MiB of Python objects.
    """
    json_length = len(body)
    if header_length is not None:
        digits = header_length.strip(" \t")
        if _LENGTH.fullmatch(digits) is None or int(digits) > len(body):
            raise RequestError(
                400,
                "Inference-Header-Content-Length is not a length within the body "
                "(ASCII digits, at most the body's size)",
            )
        json_length = int(digits)
    text = body if json_length == len(body) else body[:json_length]
    check_json_values(text, max_values, "MAX_JSON_VALUES")
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise RequestError(400, f"the request is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise RequestError(400, "the request must be a JSON object with an `inputs` list")
    return document, body[json_length:]


def _shape(tensor: dict[str, Any], label: str) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise RequestError(400, f"{label}: `shape` must be a list of non-negative integers")
    return shape


def _binary_size(tensor: dict[str, Any], label: str) -> int | None:
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError(400, f"{label}: `parameters` must be an object")
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RequestError(400, f"{label}: `binary_data_size` must be a non-negative integer")
    return size


async def input_batch(
    document: dict[str, Any], binary: bytes, settings: Settings, decoder: ImageDecoder
) -> FloatBatch:
    """The request's one input as N×28×28 float32."""
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(400, f"send exactly one input: {PIXELS!r} (FP32) or {IMAGES!r} (BYTES)")
    tensor = inputs[0]
    name, datatype = tensor.get("name"), tensor.get("datatype")
    label = f"input {str(name)[:40]!r}"
    expected = {PIXELS: "FP32", IMAGES: "BYTES"}
    if name not in expected:
        raise RequestError(400, f"unknown {label}; expected {PIXELS!r} or {IMAGES!r}")
    if datatype != expected[name]:
        raise RequestError(
            400, f"{label} has datatype {str(datatype)[:20]!r}; expected {expected[name]!r}"
        )
    shape = _shape(tensor, label)
    count = int(np.prod(shape)) if shape else 1
    size = _binary_size(tensor, label)
    if size is not None and size != len(binary):
        raise RequestError(
            400, f"{label}: binary_data_size {size} but {len(binary)} bytes follow the header"
        )
    if size is None and binary:
        raise RequestError(400, "binary data after the header that no input claims")
    if name == PIXELS:
        if len(shape) != 4 or shape[1:] != [1, 28, 28]:
            raise RequestError(400, f"{label}: shape {shape} is not [N,1,28,28]")
        check_count(shape[0], settings.MAX_FILES_PER_REQUEST)
        if size is not None:
            if size != count * 4:
                raise RequestError(400, f"{label}: {size} bytes for {count} FP32 values")
            values: Any = np.frombuffer(binary, dtype="<f4")
        else:
            values = _flat_data(tensor, label, count, numeric=True)
        return pixels_to_batch(np.asarray(values, dtype=np.float32).reshape(shape), label)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise RequestError(400, f"{label}: shape {shape} is not [N] or [N,1]")
    check_count(count, settings.MAX_FILES_PER_REQUEST)
    if size is not None:
        blobs = _split_bytes_elements(binary, count, label)
    else:
        items = _flat_data(tensor, label, count, numeric=False)
        blobs = [decode_base64(item, f"{label}[{i}]") for i, item in enumerate(items)]
    return await images_to_batch(decoder, blobs, lambda i: f"{label}[{i}]")


def _flat_data(tensor: dict[str, Any], label: str, count: int, numeric: bool) -> list[Any]:
    """The JSON `data` (flat or nested, row-major) as a flat list of `count` elements."""
    data = tensor.get("data")
    if not isinstance(data, list):
        raise RequestError(400, f"{label}: no `data` list (or binary_data_size parameter)")
    flat: list[Any] = []
    _flatten(data, flat, depth=0, label=label)
    if numeric and any(isinstance(v, bool) or not isinstance(v, int | float) for v in flat):
        raise RequestError(400, f"{label}: `data` must hold numbers")
    if len(flat) != count:
        raise RequestError(400, f"{label}: {len(flat)} values in `data` for a shape of {count}")
    return flat


def _flatten(items: list[Any], into: list[Any], depth: int, label: str) -> None:
    if depth > 4:
        raise RequestError(400, f"{label}: `data` is nested deeper than its shape")
    for item in items:
        if isinstance(item, list):
            _flatten(item, into, depth + 1, label)
        else:
            into.append(item)


def _split_bytes_elements(binary: bytes, count: int, label: str) -> list[bytes]:
    """Triton's BYTES serialisation: each element is a little-endian uint32 length + bytes."""
    blobs: list[bytes] = []
    offset = 0
    for index in range(count):
        if offset + 4 > len(binary):
            raise RequestError(400, f"{label}: binary data ends before element {index}")
        (length,) = struct.unpack_from("<I", binary, offset)
        offset += 4
        if offset + length > len(binary):
            raise RequestError(400, f"{label}[{index}]: declares {length} bytes past the end")
        blobs.append(binary[offset : offset + length])
        offset += length
    if offset != len(binary):
        raise RequestError(
            400, f"{label}: {len(binary) - offset} bytes left after {count} elements"
        )
    return blobs


def requested_outputs(document: dict[str, Any]) -> Requested:
    """Which outputs to return and which of them as binary (the client's choice).

    Each output at most once, as Triton does: the answer's size must follow from the images
    sent, not from how often a name is repeated (20,000 copies of one name in a 0.5 MB request
    made a 253 MB answer).
    """
    parameters = document.get("parameters") or {}
    all_binary = isinstance(parameters, dict) and parameters.get("binary_data_output") is True
    wanted = document.get("outputs")
    if wanted is None:
        return Requested(OUTPUTS, set(OUTPUTS) if all_binary else set())
    if not isinstance(wanted, list):
        raise RequestError(400, "`outputs` must be a list of objects with a `name`")
    if len(wanted) > len(OUTPUTS):
        raise RequestError(
            400,
            f"`outputs` names {len(wanted)} tensors; the model has {len(OUTPUTS)}: "
            f"{CLASS!r} and {PROBABILITIES!r}, each at most once",
        )
    names: list[str] = []
    binary: set[str] = set()
    for output in wanted:
        if not isinstance(output, dict):
            raise RequestError(400, "`outputs` must be a list of objects with a `name`")
        output_name = output.get("name")
        if output_name not in OUTPUTS:
            raise RequestError(
                400,
                f"unknown output {str(output_name)[:40]!r}; "
                f"expected {CLASS!r} or {PROBABILITIES!r}",
            )
        if output_name in names:
            raise RequestError(400, f"duplicate output {output_name!r} in `outputs`")
        names.append(output_name)
        params = output.get("parameters") or {}
        if all_binary or (isinstance(params, dict) and params.get("binary_data") is True):
            binary.add(output_name)
    return Requested(tuple(names), binary)
