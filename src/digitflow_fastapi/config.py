"""Service settings (pydantic-settings), read once per process from the environment.

The seed's fields (`API_NAME`, `API_V1_STR`, `LOGGER_CONFIG_PATH`, `USE_CUDA`, `USE_MPS`,
`PRED_MODEL_UUID`, `PRED_MODEL_PATH`) plus the service's limits and inference knobs. A bad value
fails at start-up with one line naming the variable (`get_settings` raises `ConfigError`).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Final

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
from digitflow.inference.image_structure import DEFAULT_MAX_SEGMENTS
from digitflow.inference.limits import (
    DEFAULT_MAX_COMPONENTS,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_WORK_PIXELS,
)
from digitflow.settings import ModelSettings, one_line
from digitflow_fastapi.edge.settings import (
    RATE_LIMIT_PATTERN,
    check_api_keys,
    parse_origins,
    read_api_keys_file,
    split_api_keys,
)

# Default bytes of a request's images probed and decoded on the loop (INLINE_DECODE_MAX_BYTES):
# 64 MNIST PNGs take ~20 KB; parsing costs at most ~0.2 µs a byte, so ≤ ~6 ms of loop time.
DEFAULT_INLINE_DECODE_BYTES: Final = 32 * 1024


class Settings(ModelSettings):
    """The seed's settings plus the service's limits and inference knobs.

    `USE_CUDA`, `USE_MPS`, `PRED_MODEL_UUID`, `PRED_MODEL_PATH` (and `PRED_MODEL_URI`,
    `PRED_MODELS_DIR`, `INFERENCE_BACKEND`, `TORCH_THREADS`) come from `ModelSettings`, which the
    CLI reads too.
    """

    API_NAME: str = Field(
        default="digitflow_fastapi",
        description="Title shown in `/docs`.",
    )
    API_V1_STR: str = Field(
        default="/api/v1",
        description="Prefix of the model endpoints.",
    )
    LOGGER_CONFIG_PATH: Path = Field(
        default=paths.DEFAULT_LOGGING_CONFIG,
        description="Logging config (`logging.config.dictConfig` YAML); default: the package's "
        "`conf/logging.yaml` (JSON lines on stderr); a path to nothing is an error.",
    )
    MAX_UPLOAD_BYTES: PositiveInt = Field(
        default=10 * 1024 * 1024,
        description="Largest request body (10 MiB by default); larger is refused from "
        "`Content-Length` (413).",
    )
    MAX_IMAGE_PIXELS: PositiveInt = Field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        description="Largest image (width × height), checked from the header (413).",
    )
    MAX_FILES_PER_REQUEST: PositiveInt = Field(
        default=64,
        description="Most `image_file` parts per request (413).",
    )
    MAX_DECODE_PIXELS: PositiveInt = Field(
        default=DEFAULT_MAX_WORK_PIXELS,
        description="Most pixels one image may decode to (from its header; JPEG at reduced scale); "
        "more: 413.",
    )
    MAX_REQUEST_DECODE_PIXELS: PositiveInt = Field(
        default=16 * 1024 * 1024,
        description="Most decoded pixels per request, all images together; more: 413.",
    )
    MAX_LARGE_DECODES_PER_WORKER: PositiveInt = Field(
        default=2,
        description="Images over 1 MP decoded at once per worker; more: 503 + `Retry-After`.",
    )
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
    HEADER_TIMEOUT_S: PositiveFloat = Field(
        default=10.0,
        description="Seconds to send the request line and headers, from connection open or the "
        "previous response (408; a silent connection is closed).",
    )
    BODY_TIMEOUT_S: PositiveFloat = Field(
        default=30.0,
        description="Seconds to send the body once the headers are in (408).",
    )
    MAX_HEADER_BYTES: PositiveInt = Field(
        default=16 * 1024,
        description="Bytes of request line + headers (431).",
    )
    MAX_HEADER_COUNT: PositiveInt = Field(
        default=100,
        description="Headers per request (431).",
    )
    MAX_CONNECTIONS_PER_WORKER: PositiveInt = Field(
        default=1000,
        description="Open connections per worker; more get 503 + `Retry-After` at once.",
    )
    MAX_IN_FLIGHT_PER_WORKER: PositiveInt = Field(
        default=128,
        description="Requests in progress per worker on the predict paths; more get 503 + "
        "`Retry-After` before their body is read.",
    )
    # Request-body bytes one worker holds at once, over all its requests (`body_budget`): a
    # chunk past it gets 503 + Retry-After. 2 workers x (128 MiB + ~250 MiB baseline) fit the
    # 1 GiB pod of deploy/k8s with room for parsing (tests/e2e/deploy/test_k8s_manifests.py checks).
    MAX_BUFFERED_BODY_BYTES_PER_WORKER: PositiveInt = Field(
        default=128 * 1024 * 1024,
        description="Request-body bytes one worker holds over all its requests (128 MiB by "
        "default); a chunk past it gets 503 + `Retry-After`; at least `MAX_UPLOAD_BYTES`.",
    )
    REUSE_PORT: bool = Field(
        default=True,
        description="One SO_REUSEPORT listening socket per worker: connections spread evenly (+30 "
        "% req/s measured); a stopping worker serves what is queued on its socket.",
    )
    RAY_ADDRESS: str | None = Field(
        default=None,
        description="The Ray cluster `digitflow serve --engine ray` joins (`ray://…` or `auto`, "
        "from a node of that cluster); unset: start a local cluster.",
    )
    MAX_BATCH_SIZE: PositiveInt = Field(
        default=64,
        description="Most images handed to the model at once when concurrent requests are "
        "batched (ONNX Runtime runs them in slices, to bound its memory).",
    )
    MAX_BATCH_WAIT_MS: NonNegativeFloat = Field(
        default=0.0,
        description="When ≥ 2 requests wait, how long to wait for more to fill a batch; 0: greedy "
        "(measured best here).",
    )
    INLINE_FORWARD_MAX_IMAGES: NonNegativeInt = Field(
        default=1,
        description="A request of at most this many images, on the only connection its worker "
        "holds, with the batcher idle, runs its forward pass at once on the event loop, skipping "
        "the batch queue (and, with `FORWARD_ON_EVENT_LOOP` off, two thread hand-offs): c=1 "
        "latency; 0: always through the queue.",
    )
    FORWARD_ON_EVENT_LOOP: bool = Field(
        default=True,
        description="Run batched forward passes on the worker's event loop instead of a separate "
        "inference thread, when the worker runs on a CPU with one inference thread (a worker per "
        "core, as `digitflow serve` and the seed's gunicorn command give); there the thread "
        "overlaps nothing and its hand-offs cost CPU and tail latency (measured in "
        "`benchmarks/README.md`). With `USE_CUDA`, `USE_MPS` or several threads the thread is "
        "kept.",
    )
    MAX_QUEUED_IMAGES_PER_WORKER: PositiveInt = Field(
        default=4096,
        description="Images waiting in a worker's batch queue; a request that does not fit gets "
        "503 + `Retry-After` at once.",
    )
    REQUEST_TIMEOUT_MS: NonNegativeFloat = Field(
        default=10_000.0,
        description="A request the model has not answered this long after it was queued gets 504; "
        "0: no deadline.",
    )
    # Model swaps: poll a `models:/name@alias` PRED_MODEL_URI every N s (0: only on SIGHUP).
    MODEL_POLL_SECONDS: NonNegativeFloat = Field(
        default=0.0,
        description="With `PRED_MODEL_URI=models:/<name>@<alias>`, ask the registry every N s and "
        "swap when the alias moves; 0: swap only on SIGHUP (any other reference with N > 0: "
        "start-up fails with one line).",
    )
    OIP_MODEL_NAME: str = Field(
        default="mnist",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="The model's name in the Open Inference Protocol v2 routes "
        "(`/v2/models/<name>/…`).",
    )
    MAX_JSON_VALUES: PositiveInt | None = Field(
        default=None,
        description="Most values in the JSON part of a /v2 infer request, counted before it is "
        "parsed (a parsed `{}` costs 24× its JSON). Unset: room for MAX_FILES_PER_REQUEST images "
        "as `pixels` numbers, nested as [N,1,28,28].",
    )
    # The ASGI edge (`digitflow_fastapi.edge.checks`): request logs, API keys, CORS, rate limit.
    REQUEST_LOG: bool = Field(
        default=False,
        description="One JSON line per request from the logger `digitflow_fastapi.access` (probes "
        "and scrapes at DEBUG; costs 1–8 % of req/s at c=64, measured); `X-Request-ID` is echoed "
        "either way.",
    )
    API_KEYS: SecretStr | None = Field(
        default=None,
        description="Comma-separated API keys (16–256 visible ASCII characters each) required on "
        "the model routes and `/metrics` as `X-API-Key` or `Authorization: Bearer`; unset: no "
        "keys, open.",
    )
    API_KEYS_FILE: Path | None = Field(
        default=None,
        description="A file of API keys, one a line (`#` comments); adds to `API_KEYS`.",
    )
    CORS_ORIGINS: str = Field(
        default="",
        description="Comma-separated origins (`https://host[:port]`) allowed to call the API from "
        "a browser, or `*`; empty: no CORS headers.",
    )
    CORS_ALLOW_CREDENTIALS: bool = Field(
        default=False,
        description="Send `Access-Control-Allow-Credentials: true` to listed origins; refused "
        "together with `*`.",
    )
    RATE_LIMIT: str | None = Field(
        default=None,
        pattern=RATE_LIMIT_PATTERN,
        description="`N/second`, `N/minute` or `N/hour` per client (API key, else address) and per "
        "worker; 429 + `Retry-After`; unset: no limit.",
    )
    RATE_LIMIT_MAX_CLIENTS: PositiveInt = Field(
        default=10_000,
        description="Most rate-limit buckets a worker keeps (least recently seen evicted).",
    )
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (comma-separated addresses
    # or networks, `*` for any). The same variable gunicorn and uvicorn read, but empty by
    # default (theirs: 127.0.0.1): a sidecar passing the header on would let clients pick the
    # address the rate limit counts. Applied by `gunicorn_conf`.
    FORWARDED_ALLOW_IPS: str = Field(
        default="",
        description="Proxies (addresses or networks, comma-separated, `*` any) whose "
        "`X-Forwarded-For`/`-Proto` are believed; empty: none (gunicorn's and uvicorn's own "
        "default would be 127.0.0.1).",
    )

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
