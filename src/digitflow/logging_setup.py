"""Logging configured once by an entry point: JSON lines for servers, plain lines for the CLI.

`current_request_id` holds the id of the HTTP request being handled (set by the server's ASGI
edge); `RequestIdFilter`, attached to a handler, stamps it on every record that handler writes,
so each line logged while a request is handled carries its `request_id`.
"""

from __future__ import annotations

import json
import logging
import logging.config
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import orjson
import yaml

from digitflow.errors import ConfigError

_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "request_id"}
)

current_request_id: ContextVar[str | None] = ContextVar("digitflow_request_id", default=None)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (the request being handled, if any) to every record; drops nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = current_request_id.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ms), level, logger, message, request id, `extra=` fields."""

    _second = -1
    _second_text = ""

    def _time(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # strftime once a second: it is most of a line's cost
            self._second_text = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
            self._second = second
        return f"{self._second_text}.{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": self._time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = record.__dict__
        request_id = fields.get("request_id")
        if request_id is not None:
            payload["request_id"] = request_id
        for key, value in fields.items():
            if key not in _STANDARD_ATTRS and key[0] != "_":
                payload[key] = value
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(payload, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:  # e.g. an int past 64 bits in an `extra=` field
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
