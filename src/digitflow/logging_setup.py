"""Logging configured once by an entry point: JSON lines for servers, plain lines for the CLI."""

from __future__ import annotations

import json
import logging
import logging.config
from pathlib import Path
from typing import Any

import yaml

from digitflow.errors import ConfigError

_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging_from_file(path: Path) -> None:
    """Apply the `logging.config.dictConfig` YAML at `path`."""
    if not path.is_file():
        raise ConfigError(f"logging config {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text())
        logging.config.dictConfig(config)
    except (yaml.YAMLError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise ConfigError(f"logging config {path} is invalid: {exc}") from None


def configure_cli_logging(verbose: bool = False) -> None:
    """Plain `message` lines on stderr for interactive commands."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", force=True
    )
    for noisy in ("mlflow", "alembic", "urllib3", "botocore", "boto3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
