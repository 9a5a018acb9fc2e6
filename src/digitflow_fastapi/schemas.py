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
    """`/ready`: what this worker loaded and checked (unset fields are left out)."""

    ready: bool
    model_loaded: bool
    model_uuid: str | None = None
    self_test: Literal["passed", "failed"] | None = None
    detail: str | None = Field(default=None, description="Why the self-test failed")
    warmed_up: bool | None = None
    golden_checked: int | None = None
    golden_file: str | None = None
