"""The core's settings, read from the environment in this one place (the server has its own).

MLflow's and AWS's usual variables (where experiments, runs and artifacts live, with their
credentials), the cache folder for derived files, and the CLI's model and engine defaults.
Empty values count as unset. Command-line options override what is read here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, NonNegativeInt, PositiveInt, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from digitflow import paths
from digitflow.errors import ConfigError

DEFAULT_TIMEOUT = 10.0
DEFAULT_EXPERIMENT = "digitflow"  # the MLflow experiment runs are logged to and listed from
DEFAULT_PULL_WORKERS = 4  # parallel downloads of one run's files
Backend = Literal["onnx", "onnx-int8", "torch"]


def is_remote_uri(uri: str | None) -> bool:
    """True when a tracking URI names an HTTP(S) server (the one place this is decided)."""
    return bool(uri and uri.startswith(("http://", "https://")))


@dataclass(frozen=True)
class StoreConfig:
    """Where experiments, runs and artifacts live, and the credentials to read them."""

    tracking_uri: str | None = None
    username: str | None = None
    password: str | None = None
    s3_endpoint_url: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    mlruns_dir: Path = paths.DEFAULT_MLRUNS_DIR
    timeout: float = DEFAULT_TIMEOUT
    s3_region: str | None = None

    @property
    def remote(self) -> bool:
        """True when the tracking URI is an HTTP(S) server."""
        return is_remote_uri(self.tracking_uri)

    def with_overrides(self, **changes: Any) -> StoreConfig:
        """A copy with the given fields replaced where the value is not None."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _admits_none(annotation: Any) -> bool:
    return annotation is None or type(None) in get_args(annotation)


class EnvSettings(BaseSettings):
    """Settings read from environment variables of the same names, where an empty value counts as
    unset for every field that may be unset (None): `X=` is no `X`."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        nullable = {name for name, f in cls.model_fields.items() if _admits_none(f.annotation)}
        return {k: None if v == "" and k in nullable else v for k, v in data.items()}


class ModelSettings(EnvSettings):
    """Which model to serve and on which engine: shared by the CLI and the server's `Settings`."""

    USE_CUDA: bool = Field(
        default=False,
        description="Use a CUDA GPU when one is available (else the CPU, with a warning); read "
        "by the server, `digitflow serve` and `digitflow train`.",
    )
    USE_MPS: bool = Field(
        default=False,
        description="Use Apple's MPS GPU when it is available (else the CPU, with a warning).",
    )
    PRED_MODEL_UUID: str = Field(
        default="",
        description="Run UUID reported by `/api/v1/model/version`; empty: the run the served "
        "model came from.",
    )
    PRED_MODEL_PATH: Path | None = Field(
        default=None,
        description="Checkpoint to serve (the run's model checkpoint; the golden set beside it "
        "is checked); read by the server, `digitflow serve` and `digitflow predict`.",
    )
    PRED_MODEL_URI: str | None = Field(
        default=None,
        description="Model reference (run UUID, `runs:/<uuid>/model`, `models:/<name>/<version>`, "
        "`models:/<name>@<alias>`) pulled at start-up when `PRED_MODEL_PATH` is unset; resolved "
        "once, before workers fork, and every worker is pinned to that run until a swap (SIGHUP "
        "or `MODEL_POLL_SECONDS`).",
    )
    PRED_MODELS_DIR: Path = Field(
        default=paths.DEFAULT_MODELS_DIR,
        description="Where `PRED_MODEL_URI` pulls runs to (`<dir>/<run uuid>/artifacts/...`).",
    )
    INFERENCE_BACKEND: Backend = Field(
        default="onnx",
        description="`onnx` (ONNX Runtime on the run's logged graph, or an export cached once "
        "per checkpoint; same predictions as torch, ~2.5× faster here), `onnx-int8` (the run's "
        "calibrated int8 graph, ~2.7× faster than `onnx` per forward pass; kept at training only "
        "if its classes agree with the float graph's on ≥ 99.5 % of held-out images and its "
        "accuracy is within 0.2 pp; the float graph when the run has none) or `torch`; a GPU "
        "request uses torch.",
    )
    TORCH_THREADS: NonNegativeInt = Field(
        default=0,
        description="Intra-op threads per worker (ONNX Runtime or torch); 0: cores // workers.",
    )

    WEB_CONCURRENCY: PositiveInt | None = Field(
        default=None,
        description="Worker processes `digitflow serve` starts when `--workers` is not given; "
        "unset: one per core.",
    )

    @property
    def model_configured(self) -> bool:
        """True when PRED_MODEL_PATH or PRED_MODEL_URI names a model."""
        return self.PRED_MODEL_PATH is not None or bool(self.PRED_MODEL_URI)


class CoreSettings(ModelSettings):
    """Environment variables the core and the CLI understand."""

    MLFLOW_TRACKING_URI: str | None = Field(
        default=None,
        description="The MLflow tracking server (`http(s)://host:port`) or a local store URI; "
        "unset: the embedded store in `mlruns/`. Same as `--tracking-uri`; the server reads it "
        "to resolve `PRED_MODEL_URI`.",
    )
    MLFLOW_TRACKING_USERNAME: str | None = Field(
        default=None,
        description="User for basic auth on that server (`mlflow server --app-name basic-auth`).",
    )
    MLFLOW_TRACKING_PASSWORD: str | None = Field(
        default=None,
        description="Password for basic auth on that server.",
    )
    MLFLOW_S3_ENDPOINT_URL: str | None = Field(
        default=None,
        description="S3-compatible endpoint for `s3://` artifact locations (ECS, MinIO, "
        "SeaweedFS); same as `--s3-endpoint-url`; unset: `AWS_ENDPOINT_URL`, else AWS's own.",
    )
    AWS_ENDPOINT_URL: str | None = Field(
        default=None,
        description="The S3 endpoint when `MLFLOW_S3_ENDPOINT_URL` is unset.",
    )
    AWS_ACCESS_KEY_ID: str | None = Field(
        default=None,
        description="Access key id for that storage; unset: boto3's usual lookup (e.g. "
        "`~/.aws/credentials`).",
    )
    AWS_SECRET_ACCESS_KEY: str | None = Field(
        default=None,
        description="Secret key for that storage; unset: boto3's usual lookup.",
    )
    AWS_REGION: str | None = Field(
        default=None,
        description="Signing region, for stores that check it; unset: `AWS_DEFAULT_REGION`, "
        "else `us-east-1`.",
    )
    AWS_DEFAULT_REGION: str | None = Field(
        default=None,
        description="Signing region when `AWS_REGION` is unset.",
    )
    DIGITFLOW_CACHE_DIR: Path | None = Field(
        default=None,
        description="Where ONNX exports are cached (a private 0700 folder; keyed by the "
        "checkpoint's SHA-256); unset: `$XDG_CACHE_HOME/digitflow`, else "
        "`~/.cache/digitflow`.",
    )
    XDG_CACHE_HOME: Path | None = Field(
        default=None,
        description="The user's cache folder (XDG); the cache is `digitflow/` inside it when "
        "`DIGITFLOW_CACHE_DIR` is unset.",
    )
    PORT: int = Field(
        default=8080,
        ge=1,
        le=65535,
        description="Port `digitflow serve` binds when `--port` is not given.",
    )

    def store(self, mlruns_dir: Path = paths.DEFAULT_MLRUNS_DIR) -> StoreConfig:
        """The artifact store these variables describe."""
        return StoreConfig(
            tracking_uri=self.MLFLOW_TRACKING_URI,
            username=self.MLFLOW_TRACKING_USERNAME,
            password=self.MLFLOW_TRACKING_PASSWORD,
            s3_endpoint_url=self.MLFLOW_S3_ENDPOINT_URL or self.AWS_ENDPOINT_URL,
            aws_access_key_id=self.AWS_ACCESS_KEY_ID,
            aws_secret_access_key=self.AWS_SECRET_ACCESS_KEY,
            s3_region=self.AWS_REGION or self.AWS_DEFAULT_REGION,
            mlruns_dir=mlruns_dir,
        )

    def cache_dir(self) -> Path:
        """Derived files (ONNX exports): `DIGITFLOW_CACHE_DIR`, else `$XDG_CACHE_HOME/digitflow`."""
        if self.DIGITFLOW_CACHE_DIR is not None:
            return self.DIGITFLOW_CACHE_DIR
        return (self.XDG_CACHE_HOME or Path.home() / ".cache") / "digitflow"


def one_line(error: ValidationError, source: str = "environment") -> str:
    """A pydantic validation error as one line naming each bad variable."""
    problems = [
        f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in error.errors()
    ]
    return f"invalid {source}: " + "; ".join(problems)


def read_core_settings() -> CoreSettings:
    """The core's settings from the environment; a bad value is one clear `ConfigError`."""
    try:
        return CoreSettings()
    except ValidationError as exc:
        raise ConfigError(one_line(exc)) from None
