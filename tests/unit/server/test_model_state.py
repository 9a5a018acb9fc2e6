"""The model state folder (what workers should serve, what was refused) and its metrics."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from digitflow.artifacts.run_layout import enclosing_run_dir, enclosing_run_id
from digitflow.digests import file_sha256
from digitflow_fastapi import metrics
from digitflow_fastapi.lifecycle import model_state
from digitflow_fastapi.lifecycle.model_state import DesiredModel


def test_a_desired_model_round_trips_and_a_torn_file_reads_as_none(tmp_path: Path) -> None:
    desired = DesiredModel(3, "u", "/m/model.pt", "ab" * 32, "r" * 32, "hup")
    model_state.write_desired(tmp_path, desired)
    assert model_state.read_desired(tmp_path) == desired
    (tmp_path / model_state.DESIRED_FILE).write_text('{"generation": 4')
    assert model_state.read_desired(tmp_path) is None


def test_refusals_are_counted_and_each_candidate_remembered_once(tmp_path: Path) -> None:
    model_state.record_refusal(tmp_path, "run-1", "run-1", "golden self-test failed")
    refusals = model_state.record_refusal(tmp_path, "run-1", "run-1", "golden self-test failed")
    assert refusals.count == 2
    assert refusals.candidates == ["run-1"]
    assert model_state.read_refusals(tmp_path).last is not None
    assert model_state.read_refusals(tmp_path).last["reason"] == "golden self-test failed"


def test_a_snapshot_keeps_the_verified_bytes_when_the_original_is_overwritten(
    tmp_path: Path,
) -> None:
    source = tmp_path / "serving" / "model.pt"
    source.parent.mkdir()
    source.write_bytes(b"weights")
    (source.parent / "golden.json").write_text("{}")
    (source.parent / "model.onnx").write_bytes(b"graph")
    (source.parent / "MLmodel").write_text("flavors: {}")
    copy, digest = model_state.snapshot_checkpoint(tmp_path / "state", source)
    source.write_bytes(b"corrupt")
    (source.parent / "model.onnx").write_bytes(b"other graph")
    assert copy.read_bytes() == b"weights"
    assert (copy.parent / "golden.json").read_text() == "{}"
    assert (copy.parent / "model.onnx").read_bytes() == b"graph"
    assert (copy.parent / "MLmodel").read_text() == "flavors: {}"
    assert digest == file_sha256(copy)
    source.write_bytes(b"weights")
    again, _ = model_state.snapshot_checkpoint(tmp_path / "state", source)
    assert again.parent != copy.parent  # the same checkpoint with another graph: another snapshot


def test_the_run_id_comes_from_a_run_folder_in_the_path() -> None:
    run = "0123456789abcdef0123456789abcdef"
    checkpoint = Path(f"/m/{run}/artifacts/model/model.pt")
    assert enclosing_run_id(checkpoint) == run
    assert enclosing_run_dir(checkpoint) == Path(f"/m/{run}")
    assert enclosing_run_id(Path("/m/current/model.pt")) is None


def _snapshot(folder: Path, pid: int, uuid: str, refused: int, age_s: float = 0.0) -> None:
    own = metrics.WorkerMetrics()
    own.model.uuid, own.model.refused, own.model.swaps = uuid, refused, 1
    path = folder / f"worker-{pid}.json"
    path.write_text(json.dumps(own.snapshot()))
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))


def test_model_info_counts_live_workers_and_swap_counts_are_the_service_s(tmp_path: Path) -> None:
    _snapshot(tmp_path, 1, "new", refused=2)
    _snapshot(tmp_path, 2, "old", refused=1, age_s=60)  # an exited worker
    own = metrics.WorkerMetrics()
    own.model.uuid, own.model.refused, own.model.swaps = "new", 2, 1
    text = metrics.render(tmp_path, own)
    assert 'digitflow_model_info{model_uuid="new"} 2' in text
    assert 'model_uuid="old"' not in text
    assert "digitflow_model_swaps_total 1" in text
    assert "digitflow_model_swaps_refused_total 2" in text
