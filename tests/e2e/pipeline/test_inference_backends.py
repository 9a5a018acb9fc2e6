"""ONNX and torch backends agree on all 1,000 test images; batching does not change answers."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from digitflow.errors import ConfigError
from digitflow.inference.classifier import Classifier
from digitflow.inference.preprocess import bytes_to_input
from tests.support.gunicorn_server import TrainedModel

pytestmark = pytest.mark.slow  # starts real servers or trains a model


@pytest.fixture(scope="module")
def test_images(data_dir: Path) -> npt.NDArray[np.float32]:
    """The 1,000 MNIST test images, preprocessed the serving way."""
    with (data_dir / "test.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return np.stack([bytes_to_input((data_dir / r["filepath"]).read_bytes()) for r in rows]).astype(
        np.float32
    )


def test_onnx_and_torch_agree_on_every_test_image(
    trained_model: TrainedModel, test_images: npt.NDArray[np.float32]
) -> None:
    torch_clf = Classifier.from_checkpoint(trained_model.model_path, backend="torch")
    onnx_clf = Classifier.from_checkpoint(trained_model.model_path, backend="onnx", num_threads=1)
    assert onnx_clf.backend == "onnx"
    a = torch_clf.log_probabilities(test_images)
    b = onnx_clf.log_probabilities(test_images)
    assert a.shape == b.shape == (len(test_images), 10)
    assert np.array_equal(a.argmax(axis=1), b.argmax(axis=1))
    assert float(np.abs(a - b).max()) < 1e-4
    assert [p.label for p in torch_clf.predict(test_images)] == [
        p.label for p in onnx_clf.predict(test_images)
    ]


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_batched_and_one_by_one_give_the_same_answers(
    trained_model: TrainedModel, test_images: npt.NDArray[np.float32], backend: str
) -> None:
    clf = Classifier.from_checkpoint(trained_model.model_path, backend=backend)
    clf.warm_up()
    sample = test_images[:50]
    batched = clf.predict(sample)
    single = [clf.predict(sample[i : i + 1])[0] for i in range(len(sample))]
    assert [p.label for p in batched] == [p.label for p in single]
    assert np.allclose(
        [p.probabilities for p in batched], [p.probabilities for p in single], atol=1e-5
    )
    assert all(abs(sum(p.probabilities) - 1.0) < 1e-4 for p in batched)


@pytest.fixture
def bare_checkpoint(trained_model: TrainedModel, tmp_path: Path) -> Path:
    """The run's model.pt alone, as trained elsewhere: no model.onnx or MLmodel beside it."""
    copy = tmp_path / "bare" / "model.pt"
    copy.parent.mkdir()
    shutil.copyfile(trained_model.model_path, copy)
    return copy


def test_a_bare_checkpoint_s_onnx_export_is_cached_once_outside_its_folder(
    bare_checkpoint: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    Classifier.from_checkpoint(bare_checkpoint, backend="onnx", cache_dir=cache)
    exports = list((tmp_path / "cache" / "onnx").glob("*.onnx"))
    assert len(exports) == 1
    assert not list(bare_checkpoint.parent.glob("*.onnx"))
    mtime = exports[0].stat().st_mtime_ns
    Classifier.from_checkpoint(bare_checkpoint, backend="onnx", cache_dir=cache)
    assert exports[0].stat().st_mtime_ns == mtime


def test_an_unknown_backend_is_refused(trained_model: TrainedModel) -> None:
    with pytest.raises(ConfigError, match="unknown inference backend"):
        Classifier.from_checkpoint(trained_model.model_path, backend="tensorrt")


def _load_in_a_fresh_process(checkpoint: Path, cache: Path) -> list[str]:
    """[backend, whether torch was imported] of a server-style load in a new interpreter."""
    code = (
        "import sys; from pathlib import Path; from digitflow.inference.selftest import "
        "load_checked_classifier as load; "
        "c, _ = load(Path(sys.argv[1]), backend='onnx', cache_dir=Path(sys.argv[2])); "
        "print(c.backend, 'torch' in sys.modules)"
    )
    command = [sys.executable, "-c", code, str(checkpoint), str(cache)]
    return subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()


def test_a_cached_onnx_export_is_served_without_importing_torch(
    bare_checkpoint: Path, tmp_path: Path
) -> None:
    # torch costs ~250 MB per server worker; with the export cached a worker never loads it.
    runs = [_load_in_a_fresh_process(bare_checkpoint, tmp_path / "cache") for _ in range(2)]
    assert runs == [["onnx", "True"], ["onnx", "False"]]  # export once, then torch-free


def test_a_run_s_logged_graph_is_served_without_torch_and_without_a_cache(
    trained_model: TrainedModel, tmp_path: Path
) -> None:
    assert (trained_model.model_path.parent / "model.onnx").is_file()
    assert _load_in_a_fresh_process(trained_model.model_path, tmp_path / "cache") == [
        "onnx",
        "False",
    ]
    assert not list((tmp_path / "cache").rglob("*.onnx"))
