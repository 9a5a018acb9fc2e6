"""Response bodies of the API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class PredictionItem(BaseModel):
    image_filename: str = Field(examples=["digit.png"])
    prediction: str = Field(examples=["7"])
    probabilities: list[float] | None = Field(
        default=None, description="Class probabilities 0–9, only with ?probabilities=true"
    )


class PredictResponse(BaseModel):
    data: list[PredictionItem]


class ModelVersion(BaseModel):
    model_uuid: str = Field(examples=["3f2c0e1b9d8a4c7e8f6a5b4c3d2e1f00"])


class VersionResponse(BaseModel):
    data: ModelVersion


class ErrorResponse(BaseModel):
    detail: str = Field(examples=["image_file 'x.txt': not an image (unrecognised bytes)"])


class HealthStatus(BaseModel):
    status: Literal["ok"]


class ReadyStatus(BaseModel):
    """`/ready`: what this worker loaded and checked (unset fields are left out). With API
    keys set, a request without a valid key gets only `ready` and `model_uuid`."""

    ready: bool
    model_loaded: bool | None = None
    model_uuid: str | None = None
    self_test: Literal["passed", "failed"] | None = None
    detail: str | None = Field(default=None, description="Why the self-test failed")
    warmed_up: bool | None = None
    golden_checked: int | None = None
    engine: str | None = Field(
        default=None, description="What runs the forward pass: onnx, onnx-int8 or torch"
    )
    model_generation: int | None = Field(
        default=None, description="Swaps since start behind the model served (0: the first)"
    )
    refused_swaps: int | None = Field(default=None, description="Model swaps refused so far")
    last_refused_swap: dict[str, str] | None = Field(
        default=None, description="The last refused swap: model_uuid, reason, at"
    )


class ExplainedPredictionItem(PredictionItem):
    model_input: list[list[float]] | None = Field(
        default=None,
        description="The 28×28 input the model saw (rows of values in 0–1, light digit on "
        "dark), only with ?explain=true",
    )


class ExplainedPredictResponse(BaseModel):
    data: list[ExplainedPredictionItem]


# --- Open Inference Protocol v2 (KServe / Triton) ---------------------------------------------


class OipError(BaseModel):
    error: str = Field(examples=["unknown model 'resnet'; this server serves 'mnist'"])


class OipServerMetadata(BaseModel):
    name: str = Field(examples=["digitflow"])
    version: str = Field(examples=["0.1.0"])
    extensions: list[str] = Field(examples=[["binary_tensor_data"]])


class OipLive(BaseModel):
    live: bool = Field(examples=[True])


class OipReady(BaseModel):
    ready: bool = Field(examples=[True])


class OipModelReady(BaseModel):
    name: str = Field(examples=["mnist"])
    ready: bool = Field(examples=[True])


class OipTensorMetadata(BaseModel):
    name: str = Field(examples=["pixels"])
    datatype: str = Field(examples=["FP32"])
    shape: list[int] = Field(examples=[[-1, 1, 28, 28]])


class OipModelMetadata(BaseModel):
    name: str = Field(examples=["mnist"])
    versions: list[str] = Field(examples=[["3f2c0e1b9d8a4c7e8f6a5b4c3d2e1f00"]])
    platform: str = Field(examples=["digitflow"])
    inputs: list[OipTensorMetadata]
    outputs: list[OipTensorMetadata]


class OipOutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[float] | None = None
    parameters: dict[str, object] | None = None


class OipInferResponse(BaseModel):
    model_name: str = Field(examples=["mnist"])
    model_version: str = Field(examples=["3f2c0e1b9d8a4c7e8f6a5b4c3d2e1f00"])
    id: str | None = None
    outputs: list[OipOutputTensor]


# --- MLflow scoring protocol ---------------------------------------------------------------------


class MlflowPrediction(BaseModel):
    prediction: int = Field(examples=[7])
    probabilities: list[float] = Field(description="Class probabilities 0–9")


class MlflowPredictions(BaseModel):
    predictions: list[MlflowPrediction]


class MlflowError(BaseModel):
    error_code: str = Field(examples=["BAD_REQUEST"])
    message: str = Field(examples=["inputs[0]: not base64"])
    detail: str = Field(examples=["inputs[0]: not base64"])
