"""Service settings (pydantic-settings), read once per process from the environment."""

from __future__ import annotations

from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict

from digitflow import paths


class Settings(BaseSettings):
    """The seed's settings plus the service's limits and inference knobs."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore")

    API_NAME: str = "digitflow_fastapi"
    API_V1_STR: str = "/api/v1"
    LOGGER_CONFIG_PATH: str = str(paths.DEFAULT_LOGGING_CONFIG)
    USE_CUDA: bool = False
    USE_MPS: bool = False
    PRED_MODEL_UUID: str = ""
    PRED_MODEL_PATH: str = ""
    PRED_MODEL_URI: str = ""
    PRED_MODELS_DIR: str = str(paths.DEFAULT_MODELS_DIR)
    MAX_UPLOAD_BYTES: int = 10 * 1024 * 1024
    MAX_IMAGE_PIXELS: int = 20_000_000
    MAX_FILES_PER_REQUEST: int = 64
    INFERENCE_BACKEND: str = "onnx"
    MAX_BATCH_SIZE: int = 64
    MAX_BATCH_WAIT_MS: float = 0.0
    TORCH_THREADS: int = 0
    WEB_CONCURRENCY: int = 1
    DIGITFLOW_METRICS_DIR: str = ""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first call."""
    return Settings()
