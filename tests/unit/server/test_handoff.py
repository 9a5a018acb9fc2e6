"""The start's one decision of which model to serve, and how the other processes read it."""

from __future__ import annotations

from pathlib import Path

import pytest

from digitflow.artifacts import refs
from digitflow.artifacts.refs import (
    PIN_VARIABLE,
    ModelPin,
    ServedModel,
    pin_served_model,
    served_model_of,
)
from digitflow.errors import ConfigError, ModelNotFound
from digitflow.settings import StoreConfig
from digitflow_fastapi import app as app_module
from digitflow_fastapi.config import Settings
from digitflow_fastapi.lifecycle import handoff as handoff_module
from digitflow_fastapi.lifecycle import model_state
from digitflow_fastapi.lifecycle.handoff import Handoff, decided_pin, read_handoff
from digitflow_fastapi.lifecycle.model_state import DesiredModel

RUN = "0123456789abcdef0123456789abcdef"
STORE = StoreConfig()


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    path.write_bytes(b"weights")
    return path


def _no_second_decision(*args: object, **kwargs: object) -> ModelPin:
    raise AssertionError("decided again")


def test_a_checkpoint_path_is_pinned_as_given_with_the_configured_uuid(checkpoint: Path) -> None:
    assert pin_served_model(checkpoint, "runs:/x/model", "u", STORE) == ModelPin(
        str(checkpoint), None, "u"
    )


def test_a_run_reference_is_pinned_to_its_run_without_downloading_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(refs, "resolve_model", _no_second_decision)
    pin = pin_served_model(None, f"runs:/{RUN}/model", None, STORE)
    assert pin == ModelPin(None, f"runs:/{RUN}/model", RUN)


def test_nothing_to_serve_or_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        pin_served_model(None, None, None, STORE)
    with pytest.raises(ModelNotFound):
        pin_served_model(tmp_path / "gone.pt", None, None, STORE)


def test_a_pinned_path_is_made_local_without_deciding_again(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(refs, "resolve_run_id", _no_second_decision)
    served = served_model_of(ModelPin(str(checkpoint), None, "u"), tmp_path, STORE)
    assert served == ServedModel(checkpoint, "u")
    checkpoint.unlink()
    with pytest.raises(ModelNotFound):
        served_model_of(ModelPin(str(checkpoint), None, "u"), tmp_path, STORE)


def test_the_pin_digitflow_serve_hands_on_is_what_the_next_process_reads(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin = ModelPin(str(checkpoint), None, "from-the-cli")
    monkeypatch.setenv(PIN_VARIABLE, pin.to_json())
    assert PIN_VARIABLE in Handoff.model_fields
    assert pin == Handoff().DIGITFLOW_SERVED_MODEL


def test_a_handed_down_pin_wins_over_deciding_again(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handed = ModelPin(None, f"runs:/{RUN}/model", RUN)
    monkeypatch.setattr(handoff_module, "pin_served_model", _no_second_decision)
    settings = Settings(PRED_MODEL_PATH=checkpoint)
    assert decided_pin(settings, Handoff(DIGITFLOW_SERVED_MODEL=handed), STORE) == handed


def test_without_a_handed_down_pin_the_process_decides_from_its_settings(checkpoint: Path) -> None:
    settings = Settings(PRED_MODEL_PATH=checkpoint, PRED_MODEL_UUID="u")
    assert decided_pin(settings, Handoff(), STORE) == ModelPin(str(checkpoint), None, "u")


def test_a_malformed_hand_off_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PIN_VARIABLE, '{"model_path": 3')
    read_handoff.cache_clear()
    try:
        with pytest.raises(ConfigError, match=PIN_VARIABLE):
            read_handoff()
    finally:
        read_handoff.cache_clear()


def test_a_gunicorn_worker_serves_the_state_folder_s_generation_and_decides_nothing(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "decided_pin", _no_second_decision)
    state = tmp_path / "state"
    state.mkdir()
    model_state.write_desired(state, DesiredModel(2, "gen-2", str(checkpoint), "ab" * 32))
    settings = Settings(PRED_MODEL_PATH=tmp_path / "other.pt")
    served, desired = app_module._model_to_serve(
        settings, Handoff(DIGITFLOW_MODEL_STATE_DIR=state), None
    )
    assert served == ServedModel(checkpoint, "gen-2")
    assert desired is not None and desired.generation == 2


def test_a_worker_whose_state_folder_names_no_model_stops_instead_of_deciding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "decided_pin", _no_second_decision)
    with pytest.raises(ConfigError, match="names no model"):
        app_module._model_to_serve(Settings(), Handoff(DIGITFLOW_MODEL_STATE_DIR=tmp_path), None)


def test_a_ray_replica_serves_the_model_it_was_given(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "decided_pin", _no_second_decision)
    given = ServedModel(checkpoint, "pinned")
    assert app_module._model_to_serve(Settings(), Handoff(), given) == (given, None)


def test_a_single_uvicorn_process_decides_itself(checkpoint: Path) -> None:
    settings = Settings(PRED_MODEL_PATH=checkpoint, PRED_MODEL_UUID="u")
    served, desired = app_module._model_to_serve(settings, Handoff(), None)
    assert (served, desired) == (ServedModel(checkpoint, "u"), None)
