"""The training configuration: YAML + key=value overrides, every mistake named."""

from __future__ import annotations

from pathlib import Path

import pytest

from digitflow.errors import ConfigError
from digitflow.paths import DEFAULT_TRAIN_CONFIG
from digitflow.training.config import TrainConfig, load_train_config


def test_the_shipped_yaml_matches_the_dataclass_defaults() -> None:
    assert load_train_config(DEFAULT_TRAIN_CONFIG) == TrainConfig()


def test_overrides_are_parsed_as_typed_values() -> None:
    config = load_train_config(DEFAULT_TRAIN_CONFIG, ["epochs=3", "lr=0.5", "augment=false"])
    assert (config.epochs, config.lr, config.augment) == (3, 0.5, False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["epoch=3"], "unknown config key"),
        (["epochs"], "not of the form key=value"),
        (["epochs=three"], "epochs must be int"),
        (["epochs=0"], "epochs must be at least 1"),
        (["device=tpu"], "device must be one of"),
        (["augment=maybe"], "augment must be true or false"),
    ],
)
def test_bad_overrides_are_refused_with_a_message(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_train_config(DEFAULT_TRAIN_CONFIG, overrides)


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(tmp_path / "nope.yaml")


def test_malformed_yaml_is_reported_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 3\nlr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_train_config(path)


def test_a_yaml_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_train_config(path)
