"""What the server's own processes hand each other through the environment: not settings for users.

- `DIGITFLOW_SERVED_MODEL`: the start's decision of which model to serve (a `ModelPin` as JSON),
  written by `digitflow serve` before it execs the gunicorn master or the Ray driver;
- `DIGITFLOW_MODEL_STATE_DIR`: the gunicorn master's model state folder (see `model_state`),
  where every worker reads the model to serve;
- `DIGITFLOW_METRICS_DIR`: where workers publish their metric snapshots for `/metrics` (a
  temporary folder the gunicorn master makes, unless one is given).

Which model is served is decided once per start, by `digitflow.artifacts.refs.pin_served_model`,
in one process: `digitflow serve` (which then becomes the gunicorn master or Ray driver), else the
gunicorn master, else the single uvicorn process or the Ray driver (`decided_pin`). Workers read
the state folder; Ray replicas get the pin from the driver.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import ValidationError

from digitflow.artifacts.refs import ModelPin, pin_served_model
from digitflow.errors import ConfigError
from digitflow.settings import EnvSettings, StoreConfig, one_line
from digitflow_fastapi.config import Settings


class Handoff(EnvSettings):
    """The values one process of the server leaves in the environment for the next."""

    DIGITFLOW_SERVED_MODEL: ModelPin | None = None
    DIGITFLOW_MODEL_STATE_DIR: Path | None = None
    DIGITFLOW_METRICS_DIR: Path | None = None


@lru_cache(maxsize=1)
def read_handoff() -> Handoff:
    """This process's hand-off, read from the environment on first call."""
    try:
        return Handoff()
    except ValidationError as exc:
        raise ConfigError(one_line(exc, "hand-off between the server's processes")) from None


def decided_pin(settings: Settings, handoff: Handoff, store: StoreConfig) -> ModelPin:
    """The start's one decision: the pin `digitflow serve` handed down (it decided before it
    became this process), else decided here, from PRED_MODEL_PATH or PRED_MODEL_URI."""
    if handoff.DIGITFLOW_SERVED_MODEL is not None:
        return handoff.DIGITFLOW_SERVED_MODEL
    return pin_served_model(
        settings.PRED_MODEL_PATH, settings.PRED_MODEL_URI, settings.PRED_MODEL_UUID or None, store
    )
