"""Service settings (pydantic-settings), read once per process from the environment.

The seed's fields (`API_NAME`, `API_V1_STR`, `LOGGER_CONFIG_PATH`, `USE_CUDA`, `USE_MPS`,
`PRED_MODEL_UUID`, `PRED_MODEL_PATH`) plus the service's limits and inference knobs. A bad value
fails at start-up with one line naming the variable (`get_settings` raises `ConfigError`).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path

from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from digitflow import paths
from digitflow.errors import ConfigError
from digitflow.inference.digit_locator import DEFAULT_MAX_COMPONENTS
from digitflow.inference.image_structure import DEFAULT_MAX_SEGMENTS
from digitflow.inference.preprocess import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_WORK_PIXELS
from digitflow.settings import ModelSettings, one_line
from digitflow_fastapi.edge.settings import (
    RATE_LIMIT_PATTERN,
    check_api_keys,
    parse_origins,
    read_api_keys_file,
    split_api_keys,
)
from digitflow_fastapi.protocols.decoding import DEFAULT_INLINE_DECODE_BYTES


class Settings(ModelSettings):
    """The seed's settings plus the service's limits and inference knobs.

    `USE_CUDA`, `USE_MPS`, `PRED_MODEL_UUID`, `PRED_MODEL_PATH` (and `PRED_MODEL_URI`,
    `PRED_MODELS_DIR`, `INFERENCE_BACKEND`, `TORCH_THREADS`) come from `ModelSettings`, which the
    CLI reads too.
    """

    API_NAME: str = "digitflow_fastapi"
    API_V1_STR: str = "/api/v1"
    LOGGER_CONFIG_PATH: Path = paths.DEFAULT_LOGGING_CONFIG
    MAX_UPLOAD_BYTES: PositiveInt = 10 * 1024 * 1024
    MAX_IMAGE_PIXELS: PositiveInt = DEFAULT_MAX_IMAGE_PIXELS
    MAX_FILES_PER_REQUEST: PositiveInt = 64
    MAX_DECODE_PIXELS: PositiveInt = DEFAULT_MAX_WORK_PIXELS
    MAX_REQUEST_DECODE_PIXELS: PositiveInt = 16 * 1024 * 1024
    MAX_LARGE_DECODES_PER_WORKER: PositiveInt = 2
    INLINE_DECODE_MAX_BYTES: NonNegativeInt = Field(
        default=DEFAULT_INLINE_DECODE_BYTES,
        description="Bytes of a request's images probed and decoded on the event loop (small "
        "MNIST PNGs); the rest go to a worker thread, as parse cost grows with file size.",
    )
    MAX_IMAGE_SEGMENTS: PositiveInt = Field(
        default=DEFAULT_MAX_SEGMENTS,
        description="Most PNG chunks, JPEG markers before the image data, or GIF blocks one "
        "image may hold (413 beyond): floods of them cost the parser seconds.",
    )
    MAX_DIGIT_COMPONENTS: PositiveInt = Field(
        default=DEFAULT_MAX_COMPONENTS,
        description="Most ink components the digit locator groups; an image with more is "
        "noise and reads as one without a digit (the blank input).",
    )
    HEADER_TIMEOUT_S: PositiveFloat = 10.0
    BODY_TIMEOUT_S: PositiveFloat = 30.0
    MAX_HEADER_BYTES: PositiveInt = 16 * 1024
    MAX_HEADER_COUNT: PositiveInt = 100
    MAX_CONNECTIONS_PER_WORKER: PositiveInt = 1000
    MAX_IN_FLIGHT_PER_WORKER: PositiveInt = 128
    # Request-body bytes one worker holds at once, over all its requests (`body_budget`): a
    # chunk past it gets 503 + Retry-After. 2 workers x (128 MiB + ~250 MiB baseline) fit the
    # 1 GiB pod of deploy/k8s with room for parsing (tests/e2e/deploy/test_k8s_manifests.py checks).
    MAX_BUFFERED_BODY_BYTES_PER_WORKER: PositiveInt = 128 * 1024 * 1024
    REUSE_PORT: bool = True
    RAY_ADDRESS: str | None = None  # `digitflow serve --engine ray`: join this cluster
    MAX_BATCH_SIZE: PositiveInt = 64
    MAX_BATCH_WAIT_MS: NonNegativeFloat = 0.0
    MAX_QUEUED_IMAGES_PER_WORKER: PositiveInt = 4096
    REQUEST_TIMEOUT_MS: NonNegativeFloat = 10_000.0  # 0: no deadline
    # Model swaps: poll a `models:/name@alias` PRED_MODEL_URI every N s (0: only on SIGHUP).
    MODEL_POLL_SECONDS: NonNegativeFloat = 0.0
    OIP_MODEL_NAME: str = Field(default="mnist", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    MAX_JSON_VALUES: PositiveInt | None = Field(
        default=None,
        description="Most values in the JSON part of a /v2 infer request, counted before it is "
        "parsed (a parsed `{}` costs 24× its JSON). Unset: room for MAX_FILES_PER_REQUEST images "
        "as `pixels` numbers, nested as [N,1,28,28].",
    )
    # The ASGI edge (`digitflow_fastapi.edge.checks`): request logs, API keys, CORS, rate limit.
    REQUEST_LOG: bool = False  # measured: the line costs 5-8 % of req/s at c=64
    API_KEYS: SecretStr | None = None
    API_KEYS_FILE: Path | None = None
    CORS_ORIGINS: str = ""
    CORS_ALLOW_CREDENTIALS: bool = False
    RATE_LIMIT: str | None = Field(default=None, pattern=RATE_LIMIT_PATTERN)
    RATE_LIMIT_MAX_CLIENTS: PositiveInt = 10_000
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (comma-separated addresses
    # or networks, `*` for any). The same variable gunicorn and uvicorn read, but empty by
    # default (theirs: 127.0.0.1): a sidecar passing the header on would let clients pick the
    # address the rate limit counts. Applied by `gunicorn_conf`.
    FORWARDED_ALLOW_IPS: str = ""

    @field_validator("LOGGER_CONFIG_PATH")
    @classmethod
    def _logging_config_exists(cls, value: Path) -> Path:
        if not value.is_file():
            raise ValueError(f"{value} is not a file")
        return value

    @field_validator("API_KEYS")
    @classmethod
    def _keys_are_well_formed(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_api_keys(split_api_keys(value.get_secret_value()), "API_KEYS")
        return value

    @field_validator("API_KEYS_FILE")
    @classmethod
    def _keys_file_is_readable(cls, value: Path | None) -> Path | None:
        if value is not None:
            check_api_keys(read_api_keys_file(value), "API_KEYS_FILE")
        return value

    @field_validator("FORWARDED_ALLOW_IPS")
    @classmethod
    def _proxies_are_addresses(cls, value: str) -> str:
        for entry in (item.strip() for item in value.split(",")):
            if entry and entry != "*":
                ipaddress.ip_network(entry)  # ValueError names the bad entry
        return value

    @field_validator("CORS_ORIGINS")
    @classmethod
    def _origins_are_origins(cls, value: str) -> str:
        parse_origins(value)
        return value

    @model_validator(mode="after")
    def _one_upload_fits_the_body_budget(self) -> Settings:
        if self.MAX_BUFFERED_BODY_BYTES_PER_WORKER < self.MAX_UPLOAD_BYTES:
            raise ValueError(
                f"MAX_BUFFERED_BODY_BYTES_PER_WORKER ({self.MAX_BUFFERED_BODY_BYTES_PER_WORKER}) "
                f"is smaller than MAX_UPLOAD_BYTES ({self.MAX_UPLOAD_BYTES}): an upload of the "
                "allowed size could never be read"
            )
        return self

    @model_validator(mode="after")
    def _no_wildcard_with_credentials(self) -> Settings:
        if self.CORS_ALLOW_CREDENTIALS and "*" in parse_origins(self.CORS_ORIGINS):
            raise ValueError(
                "CORS_ORIGINS='*' cannot be combined with CORS_ALLOW_CREDENTIALS=true; "
                "list the origins instead"
            )
        return self

    def api_keys(self) -> tuple[str, ...]:
        """Every accepted key: `API_KEYS` (comma-separated) plus `API_KEYS_FILE` (one a line)."""
        keys = split_api_keys(self.API_KEYS.get_secret_value()) if self.API_KEYS else []
        if self.API_KEYS_FILE is not None:
            keys += read_api_keys_file(self.API_KEYS_FILE)
        return tuple(dict.fromkeys(keys))

    def json_values_cap(self) -> int:
        """`MAX_JSON_VALUES`, else per image 784 numbers and 30 nested lists, plus 1024."""
        if self.MAX_JSON_VALUES is not None:
            return self.MAX_JSON_VALUES
        return self.MAX_FILES_PER_REQUEST * (784 + 30) + 1024

    def cors_origins(self) -> tuple[str, ...]:
        """The allowed origins (empty: no CORS headers at all; `*`: any origin)."""
        return parse_origins(self.CORS_ORIGINS)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first call."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(one_line(exc)) from None
