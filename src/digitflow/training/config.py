"""The training configuration: `conf/train_model.yaml` plus `key=value` overrides, validated."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from digitflow.errors import ConfigError

DEVICES = ("cpu", "cuda", "mps", "auto")


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run; the resolved copy is logged as `train_model_config.json`."""

    mlflow_exp_name: str = "digitflow"
    mlflow_run_name: str = "default"
    seed: int = 1111
    epochs: int = 30
    lr: float = 1.0
    gamma: float = 0.88
    train_bs: int = 32
    test_bs: int = 1000
    augment: bool = True
    photos: int = 1500
    photo_rate: float = 0.3
    model_checkpoint_interval: int = 0
    device: str = "cpu"
    num_threads: int = 0
    train_limit: int = 0
    golden_count: int = 40

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able values."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The config as pretty JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _coerce(key: str, raw: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0", "yes", "no"):
            return raw.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, not {raw!r}")
    if kind is int and isinstance(raw, bool):
        raise ConfigError(f"{key} must be an integer, not {raw!r}")
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be {kind.__name__}, not {raw!r}") from None
    if kind is int and isinstance(raw, float) and raw != value:
        raise ConfigError(f"{key} must be an integer, not {raw!r}")
    return value


def _validate(config: TrainConfig) -> TrainConfig:
    positive = ("epochs", "train_bs", "test_bs")
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1")
    for name in ("model_checkpoint_interval", "num_threads", "train_limit", "golden_count"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must not be negative")
    if config.photos < 0 or not 0 <= config.photo_rate <= 1:
        raise ConfigError("photos must not be negative and photo_rate must be in [0, 1]")
    if config.lr <= 0 or not 0 < config.gamma <= 1:
        raise ConfigError("lr must be positive and gamma in (0, 1]")
    if config.device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, not {config.device!r}")
    if not config.mlflow_exp_name.strip():
        raise ConfigError("mlflow_exp_name must not be empty")
    return config


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["epochs=3", "lr=0.5"]` → `{"epochs": 3, "lr": 0.5}` (values parsed as YAML scalars)."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            parsed[key.strip()] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            parsed[key.strip()] = value
    return parsed


def load_train_config(path: Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read `path` (if given), apply `overrides`, check every key and type."""
    values: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file {path} is not valid YAML{where}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        values.update(loaded)
    values.update(parse_overrides(overrides or []))
    known = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown config key(s): {', '.join(unknown)}; known keys: {', '.join(known)}"
        )
    kinds = {"str": str, "int": int, "float": float, "bool": bool}
    typed = {key: _coerce(key, value, kinds[str(known[key].type)]) for key, value in values.items()}
    return _validate(TrainConfig(**typed))
