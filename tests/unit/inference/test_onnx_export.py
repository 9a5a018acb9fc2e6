"""The ONNX export cache: private to this user, never through links, rebuilt when damaged."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from digitflow.inference.classifier import SESSION_SLICE, Classifier
from digitflow.inference.onnx_export import (
    export_model,
    export_name,
    onnx_session,
    private_folder,
    read_cached,
)
from digitflow.training.checkpoint import load_model, save_checkpoint
from digitflow.training.net import Net


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained Net in the template's checkpoint format (no training needed here)."""
    torch.manual_seed(0)
    model = Net()
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model, torch.optim.Adadelta(model.parameters()), 1, 0.0, 0.0)
    return path


def test_the_cache_folder_is_created_private(tmp_path: Path) -> None:
    folder = private_folder(tmp_path / "cache")
    assert folder == tmp_path / "cache" / "onnx"
    assert folder.stat().st_mode & 0o777 == 0o700


def test_an_own_cache_folder_open_to_others_is_closed_and_a_link_is_not_used(
    tmp_path: Path,
) -> None:
    shared = tmp_path / "shared" / "onnx"
    shared.mkdir(parents=True, mode=0o777)
    shared.chmod(0o777)
    assert private_folder(tmp_path / "shared") == shared
    assert shared.stat().st_mode & 0o777 == 0o700
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "onnx").symlink_to(tmp_path / "elsewhere")
    assert private_folder(tmp_path / "linked") is None


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make files owned by another user")
def test_a_cache_folder_or_export_owned_by_another_user_is_not_used(
    checkpoint: Path, tmp_path: Path
) -> None:
    theirs = tmp_path / "theirs" / "onnx"
    theirs.mkdir(parents=True, mode=0o700)
    os.chown(theirs, 65534, 65534)
    assert private_folder(tmp_path / "theirs") is None
    mine = private_folder(tmp_path / "mine")
    assert mine is not None
    planted = mine / export_name(checkpoint)
    planted.write_bytes(b"planted")
    os.chown(planted, 65534, 65534)
    assert read_cached(mine, export_name(checkpoint)) is None


def test_a_planted_link_in_place_of_an_export_is_not_loaded(
    checkpoint: Path, tmp_path: Path
) -> None:
    folder = private_folder(tmp_path / "cache")
    assert folder is not None
    planted = tmp_path / "planted.onnx"
    planted.write_bytes(b"someone else's model")
    (folder / export_name(checkpoint)).symlink_to(planted)
    assert read_cached(folder, export_name(checkpoint)) is None
    classifier = Classifier.from_checkpoint(
        checkpoint, backend="onnx", cache_dir=tmp_path / "cache"
    )
    assert classifier.backend == "onnx"
    assert planted.read_bytes() == b"someone else's model"  # written through, never followed


@pytest.mark.parametrize("damage", [b"", b"not an onnx model"])
def test_an_empty_or_corrupt_export_is_rebuilt(
    checkpoint: Path, tmp_path: Path, damage: bytes
) -> None:
    cache = tmp_path / "cache"
    first = Classifier.from_checkpoint(checkpoint, backend="onnx", cache_dir=cache)
    export = cache / "onnx" / export_name(checkpoint)
    good = export.read_bytes()
    export.write_bytes(damage)
    again = Classifier.from_checkpoint(checkpoint, backend="onnx", cache_dir=cache)
    assert export.read_bytes() == good
    sample = torch.rand(3, 28, 28).numpy()
    assert [p.label for p in again.predict(sample)] == [p.label for p in first.predict(sample)]


def test_without_a_cache_folder_the_export_stays_in_memory(checkpoint: Path) -> None:
    classifier = Classifier.from_checkpoint(checkpoint, backend="onnx", cache_dir=None)
    assert classifier.backend == "onnx"


def test_a_session_does_not_keep_the_graph_bytes_it_was_built_from(checkpoint: Path) -> None:
    """The weights live in the session; a second copy of the graph would stay for its life."""
    graph = export_model(load_model(checkpoint, torch.device("cpu")), None, "unused")
    session = onnx_session(graph, 1)
    holders = gc.get_referrers(graph)
    assert not any(holder is session or holder is vars(session) for holder in holders)
    sample = torch.rand(2, 1, 28, 28).numpy()
    assert session.run(None, {"images": sample})[0].shape == (2, 10)


class RecordingSession:
    """A real session that notes how many images each run gets."""

    def __init__(self, session: Any) -> None:
        self.session, self.sizes = session, list[int]()

    def run(self, outputs: Any, feeds: dict[str, Any]) -> Any:
        self.sizes.append(len(feeds["images"]))
        return self.session.run(outputs, feeds)


def test_a_large_batch_runs_in_slices_with_the_answers_of_one_run(checkpoint: Path) -> None:
    """The session's arena keeps room for the largest run it has seen; slices bound that."""
    session = onnx_session(export_model(load_model(checkpoint), None, "unused"), 1)
    recording = RecordingSession(session)
    classifier = Classifier(session=recording)
    batch = torch.rand(2 * SESSION_SLICE + 3, 1, 28, 28).numpy()
    sliced = classifier.log_probabilities(batch)
    assert recording.sizes == [SESSION_SLICE, SESSION_SLICE, 3]
    (whole,) = session.run(None, {"images": batch})
    np.testing.assert_allclose(sliced, whole, rtol=1e-5, atol=1e-6)
    assert classifier.log_probabilities(batch[:0]).shape == (0, 10)
