"""The int8 graph: when it is kept beside `model.onnx`, and when a server serves it."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from digitflow.inference import onnx_export
from digitflow.inference.classifier import Classifier
from digitflow.inference.served_graph import logged_graph, read_record
from digitflow.training.golden import GoldenImage
from digitflow.training.mlflow_model import write_mlflow_model
from digitflow.training.net import Net
from digitflow.training.quantize import (
    MAX_ACCURACY_DROP,
    MIN_AGREEMENT,
    CheckImages,
    Int8Check,
    classes,
    quantize,
)


def _check(agreement: float = 1.0, accuracy: float = 0.98, golden: int = 0) -> Int8Check:
    return Int8Check(1000, agreement, 0.98, accuracy, golden, 300)


@pytest.mark.parametrize(
    ("check", "reason"),
    [
        (_check(agreement=MIN_AGREEMENT), None),
        (_check(agreement=MIN_AGREEMENT - 0.001), "classes agree on 99.40%"),
        (_check(accuracy=0.98 - MAX_ACCURACY_DROP), None),
        (_check(accuracy=0.98 + MAX_ACCURACY_DROP), None),
        (_check(accuracy=0.98 - 0.003), "accuracy 97.70% vs 98.00% float"),
        (_check(accuracy=0.98 + 0.003), "accuracy 98.30% vs 98.00% float"),
        (_check(golden=1), "1 golden images get another answer"),
    ],
)
def test_the_int8_graph_is_kept_only_within_the_bar(check: Int8Check, reason: str | None) -> None:
    failures = check.failures()
    if reason is None:
        assert failures == []
    else:
        assert len(failures) == 1 and reason in failures[0]


def _net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def _noise(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 1, 28, 28), dtype=np.float32)


@pytest.fixture(scope="module")
def float_graph() -> bytes:
    return onnx_export.export_model(_net(7), None, "x")


def test_quantizing_gives_a_smaller_different_graph_that_still_classifies(
    float_graph: bytes,
) -> None:
    int8 = quantize(float_graph, _noise(64, 1))
    assert int8 != float_graph and len(int8) < len(float_graph) / 3
    assert classes(int8, _noise(16, 2)).shape == (16,)


def _export_with_wrong_golden_answers(folder: Path) -> Int8Check | None:
    """`folder/model.pt` (an untrained net) made an MLflow Model, its int8 graph judged on noise
    labelled with the float graph's own classes and on golden images given wrong answers."""
    net = _net(7)
    folder.mkdir(parents=True)
    torch.save(net.state_dict(), folder / "model.pt")
    held_out = _noise(200, 3)
    golden_inputs = _noise(4, 4)
    graph = onnx_export.export_model(net, None, "x")
    golden_classes = (classes(graph, golden_inputs) + 1) % 10
    pngs = [_png(image[0]) for image in golden_inputs]
    golden = [
        GoldenImage(f"g{i}.png", 0, str(int(c)), png)
        for i, (c, png) in enumerate(zip(golden_classes, pngs, strict=True))
    ]
    data = CheckImages(_noise(64, 1), held_out, classes(graph, held_out))
    return write_mlflow_model(folder / "model.pt", net, golden, data).int8_check


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((image * 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_an_int8_graph_short_of_the_bar_is_not_kept_and_the_check_says_why(
    tmp_path: Path,
) -> None:
    check = _export_with_wrong_golden_answers(tmp_path / "model")
    assert check is not None and check.golden_disagreements == 4
    assert "4 golden images get another answer" in check.failures()[-1]
    assert not (tmp_path / "model" / "model.int8.onnx").exists()
    record = read_record(tmp_path / "model" / "MLmodel")
    assert record is not None and record.int8_sha256 is None
    assert logged_graph(tmp_path / "model" / "model.pt", int8=True) is None


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder whose MLmodel vouches for a hand-made int8 graph (no check applied), so
    the serving side can be shown to pick exactly that file."""
    folder = tmp_path_factory.mktemp("int8") / "model"
    net = _net(7)
    folder.mkdir()
    torch.save(net.state_dict(), folder / "model.pt")
    write_mlflow_model(folder / "model.pt", net, [])
    int8 = quantize((folder / "model.onnx").read_bytes(), _noise(64, 1))
    (folder / "model.int8.onnx").write_bytes(int8)
    description = yaml.safe_load((folder / "MLmodel").read_text())
    description["metadata"]["digitflow"]["int8"] = {
        "file": "model.int8.onnx",
        "onnx_sha256": hashlib.sha256(int8).hexdigest(),
        "agreement": 1.0,
    }
    (folder / "MLmodel").write_text(yaml.safe_dump(description))
    return folder


def test_onnx_int8_serves_the_vouched_int8_graph(int8_folder: Path) -> None:
    int8 = (int8_folder / "model.int8.onnx").read_bytes()
    assert logged_graph(int8_folder / "model.pt", int8=True) == int8
    record = read_record(int8_folder / "MLmodel")
    assert record is not None and record.int8_check == {"agreement": 1.0}
    served = Classifier.from_checkpoint(int8_folder / "model.pt", backend="onnx-int8")
    plain = Classifier.from_checkpoint(int8_folder / "model.pt", backend="onnx")
    assert (served.backend, plain.backend) == ("onnx-int8", "onnx")
    x = _noise(32, 9)
    (expected,) = onnx_export.onnx_session(int8, 1).run(None, {"images": x})
    assert np.array_equal(served.log_probabilities(x), expected)
    assert not np.array_equal(served.log_probabilities(x), plain.log_probabilities(x))


def test_a_tampered_int8_graph_falls_back_to_the_float_graph(
    int8_folder: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "model"
    shutil.copytree(int8_folder, copy)
    with (copy / "model.int8.onnx").open("ab") as handle:
        handle.write(b"\0")
    assert logged_graph(copy / "model.pt", int8=True) is None
    served = Classifier.from_checkpoint(copy / "model.pt", backend="onnx-int8")
    assert served.backend == "onnx"
    x = _noise(8, 9)
    (expected,) = onnx_export.onnx_session((copy / "model.onnx").read_bytes(), 1).run(
        None, {"images": x}
    )
    assert np.array_equal(served.log_probabilities(x), expected)
