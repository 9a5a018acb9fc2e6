"""Checkpoints the server accepts and refuses: both formats, GPU-saved, code-carrying pickles."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from digitflow.errors import InvalidCheckpoint, ModelNotFound
from digitflow.inference.classifier import Classifier
from digitflow.training.net import Net
from tests.support.gunicorn_server import TrainedModel


def _state(model: TrainedModel) -> dict[str, torch.Tensor]:
    payload = torch.load(model.model_path, map_location="cpu", weights_only=True)
    state: dict[str, torch.Tensor] = payload["model_state_dict"]
    return state


def _sample() -> np.ndarray:
    return np.random.default_rng(0).random((4, 28, 28), dtype=np.float32)


def test_the_template_dict_and_a_bare_state_dict_give_the_same_answers(
    trained_model: TrainedModel, tmp_path: Path
) -> None:
    bare = tmp_path / "bare.pt"
    torch.save(_state(trained_model), bare)
    a = Classifier.from_checkpoint(trained_model.model_path).predict(_sample())
    b = Classifier.from_checkpoint(bare).predict(_sample())
    assert a == b
    assert not Classifier.from_checkpoint(bare).model.training


def write_as_if_saved_on_gpu(state: dict[str, torch.Tensor], path: Path) -> None:
    """torch.save on CPU, then relabel every storage's location as cuda:0 in the pickle."""
    plain = path.with_suffix(".cpu.pt")
    torch.save(state, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                relabelled = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
                assert relabelled != data
                data = relabelled
            dst.writestr(info, data)


def test_a_checkpoint_saved_on_a_gpu_loads_on_a_cpu_only_host(
    trained_model: TrainedModel, tmp_path: Path
) -> None:
    gpu = tmp_path / "gpu.pt"
    write_as_if_saved_on_gpu(_state(trained_model), gpu)
    with pytest.raises(RuntimeError):  # proves the file really asks for CUDA
        torch.load(gpu, weights_only=True)
    a = Classifier.from_checkpoint(trained_model.model_path).predict(_sample())
    assert Classifier.from_checkpoint(gpu).predict(_sample()) == a


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_a_pickle_that_carries_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pt"
    torch.save({"model_state_dict": _Payload(marker)}, evil, pickle_module=pickle)
    with pytest.raises(InvalidCheckpoint, match="refused"):
        Classifier.from_checkpoint(evil)
    assert not marker.exists()


def test_missing_corrupt_and_mismatched_checkpoints_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"nope\.pt"):
        Classifier.from_checkpoint(tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(InvalidCheckpoint, match=r"corrupt\.pt: not a readable PyTorch checkpoint"):
        Classifier.from_checkpoint(corrupt)
    other = tmp_path / "other.pt"
    torch.save({"fc9.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(InvalidCheckpoint, match="does not fit"):
        Classifier.from_checkpoint(other)
    assert isinstance(Net(), torch.nn.Module)
