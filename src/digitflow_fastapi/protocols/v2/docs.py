"""The v2 model's metadata and the OpenAPI examples of its routes (kept out of the router)."""

from __future__ import annotations

from typing import Any

INPUTS = [
    {"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 28, 28]},
    {"name": "images", "datatype": "BYTES", "shape": [-1]},
]
OUTPUTS = [
    {"name": "class", "datatype": "INT64", "shape": [-1]},
    {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
]
_UUID = "3f2c0e1b9d8a4c7e8f6a5b4c3d2e1f00"
# A 1×1 white PNG: decodes, so the example runs as is from /docs.
_PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGP4DwABAQEAVhJHKwAAAABJRU5ErkJggg=="
)


def model_metadata(name: str, model_uuid: str) -> dict[str, Any]:
    """`GET /v2/models/{name}`: one version (the run uuid), two inputs, two outputs."""
    return {
        "name": name,
        "versions": [model_uuid],
        "platform": "digitflow",
        "inputs": INPUTS,
        "outputs": OUTPUTS,
    }


METADATA_EXAMPLE: dict[str, Any] = {
    "content": {"application/json": {"example": model_metadata("mnist", _UUID)}}
}

INFER_RESPONSE_EXAMPLE: dict[str, Any] = {
    "description": "JSON outputs; binary ones when asked (Triton's binary tensor extension)",
    "content": {
        "application/json": {
            "example": {
                "model_name": "mnist",
                "model_version": _UUID,
                "id": "42",
                "outputs": [
                    {"name": "class", "datatype": "INT64", "shape": [1], "data": [7]},
                    {
                        "name": "probabilities",
                        "datatype": "FP32",
                        "shape": [1, 10],
                        "data": [0.0, 0.0, 0.001, 0.002, 0.0, 0.0, 0.0, 0.995, 0.0, 0.002],
                    },
                ],
            }
        }
    },
}

_TENSOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string", "enum": ["pixels", "images"]},
        "datatype": {"type": "string", "enum": ["FP32", "BYTES"]},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "data": {
            "type": "array",
            "items": {},
            "description": "`pixels`: 784·N numbers in [0, 1], flat or nested; `images`: "
            "base64-encoded image files",
        },
        "parameters": {
            "type": "object",
            "description": "`binary_data_size` when the tensor is sent as binary",
        },
    },
}

INFER_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "parameters": {"type": "object"},
                    "inputs": {"type": "array", "items": _TENSOR_SCHEMA, "maxItems": 1},
                    "outputs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "name": {"type": "string", "enum": ["class", "probabilities"]},
                                "parameters": {"type": "object"},
                            },
                        },
                    },
                },
            },
            "examples": {
                "images": {
                    "summary": "An encoded image (base64 in JSON)",
                    "value": {
                        "id": "42",
                        "inputs": [
                            {
                                "name": "images",
                                "datatype": "BYTES",
                                "shape": [1],
                                "data": [_PNG_B64],
                            }
                        ],
                    },
                },
                "pixels": {
                    "summary": "A 28×28 tensor in [0, 1] (here blank)",
                    "value": {
                        "inputs": [
                            {
                                "name": "pixels",
                                "datatype": "FP32",
                                "shape": [1, 1, 28, 28],
                                "data": [0.0] * 784,
                            }
                        ],
                        "outputs": [{"name": "class"}],
                    },
                },
            },
        },
        "application/octet-stream": {
            "schema": {"type": "string", "format": "binary"},
            "description": "Triton's binary tensor extension: the JSON header (its length in "
            "the `Inference-Header-Content-Length` header), then the tensors' bytes",
        },
    },
}
