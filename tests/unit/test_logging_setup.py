"""Logging: the shipped YAML gives one JSON object per line; a bad file is named."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from digitflow.errors import ConfigError
from digitflow.logging_setup import JsonFormatter, configure_logging_from_file
from digitflow.paths import DEFAULT_LOGGING_CONFIG


def test_json_formatter_writes_message_level_and_extra_fields() -> None:
    record = logging.LogRecord("digitflow.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    record.run_id = "abc"
    payload = json.loads(JsonFormatter().format(record))
    assert payload["message"] == "hello you" and payload["level"] == "INFO"
    assert payload["logger"] == "digitflow.x" and payload["run_id"] == "abc"


def test_the_shipped_logging_config_applies() -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        configure_logging_from_file(DEFAULT_LOGGING_CONFIG)
        assert any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_a_missing_or_invalid_logging_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        configure_logging_from_file(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nhandlers: {h: {class: no.such.Handler}}\n")
    with pytest.raises(ConfigError, match="invalid"):
        configure_logging_from_file(bad)
