"""The MLflow Model folder `digitflow train`/`export` writes, and when a server trusts its graph."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from digitflow.errors import GraphMismatch
from digitflow.inference import onnx_export
from digitflow.inference.served_graph import logged_graph, read_record
from digitflow.training.mlflow_model import check_graph, check_images, write_mlflow_model
from digitflow.training.net import Net

REPO_SRC = Path(__file__).resolve().parents[3] / "src"


def _net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a checkpoint (bare state dict) made an MLflow Model by the exporter."""
    folder = tmp_path_factory.mktemp("mlflow-model") / "model"
    folder.mkdir()
    net = _net(1)
    torch.save(net.state_dict(), folder / "model.pt")
    write_mlflow_model(folder / "model.pt", net, [])
    return folder


@pytest.fixture
def copy(model_folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(model_folder, target)
    return target


def test_the_folder_is_an_mlflow_model_with_the_onnx_flavor_and_the_served_signature(
    model_folder: Path,
) -> None:
    description = yaml.safe_load((model_folder / "MLmodel").read_text())
    assert description["flavors"]["python_function"]["loader_module"] == "mlflow.onnx"
    assert description["flavors"]["onnx"]["data"] == "model.onnx"
    (spec,) = json.loads(description["signature"]["inputs"])
    assert spec["tensor-spec"] == {"dtype": "float32", "shape": [-1, 1, 28, 28]}
    example = json.loads((model_folder / "serving_input_example.json").read_text())
    assert np.asarray(example["inputs"]).shape == (1, 1, 28, 28)
    record = read_record(model_folder / "MLmodel")
    assert record is not None
    assert (
        record.onnx_sha256 == hashlib.sha256((model_folder / "model.onnx").read_bytes()).hexdigest()
    )
    assert (
        record.checkpoint_sha256
        == hashlib.sha256((model_folder / "model.pt").read_bytes()).hexdigest()
    )


def test_the_logged_graph_is_served_when_both_digests_match(model_folder: Path) -> None:
    assert logged_graph(model_folder / "model.pt") == (model_folder / "model.onnx").read_bytes()


def test_a_replaced_checkpoint_is_not_served_with_the_old_graph(copy: Path) -> None:
    torch.save(_net(2).state_dict(), copy / "model.pt")
    assert logged_graph(copy / "model.pt") is None


def test_a_tampered_graph_is_not_served(copy: Path) -> None:
    with (copy / "model.onnx").open("ab") as handle:
        handle.write(b"\0")
    assert logged_graph(copy / "model.pt") is None


@pytest.mark.parametrize(
    "text", ["flavors: {}\n", "metadata: {digitflow: {onnx_sha256: abc}}\n", "[unclosed\n", ""]
)
def test_an_mlmodel_without_valid_digests_vouches_for_nothing(copy: Path, text: str) -> None:
    (copy / "MLmodel").write_text(text)
    assert read_record(copy / "MLmodel") is None
    assert logged_graph(copy / "model.pt") is None


def test_a_graph_of_other_weights_fails_the_check_against_torch() -> None:
    other = onnx_export.export_model(_net(3), None, "x")
    with pytest.raises(GraphMismatch, match="disagrees with torch"):
        check_graph(_net(4), other, check_images([]))


def _load_without_torch(folder: Path) -> subprocess.CompletedProcess[str]:
    """Load the folder's checkpoint as the slim image's server does: torch not importable."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from pathlib import Path\n"
        "from digitflow.errors import ConfigError\n"
        "from digitflow.inference.classifier import Classifier\n"
        "try:\n"
        f"    c = Classifier.from_checkpoint(Path({str(folder / 'model.pt')!r}), backend='onnx')\n"
        "except ConfigError as exc:\n"
        "    print(exc); raise SystemExit(2)\n"
        "x = np.random.default_rng(5).random((8, 28, 28), dtype=np.float32)\n"
        "print([p.label for p in c.predict(x)])\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO_SRC), "PATH": "/usr/bin:/bin"},
        check=False,
    )


def test_without_torch_the_logged_graph_serves_the_checkpoint_s_answers(model_folder: Path) -> None:
    result = _load_without_torch(model_folder)
    assert result.returncode == 0, result.stderr
    x = np.random.default_rng(5).random((8, 28, 28), dtype=np.float32)
    with torch.inference_mode():
        expected = _net(1)(torch.from_numpy(x[:, None])).argmax(1).tolist()
    assert result.stdout.strip() == str(expected)


def test_without_torch_a_checkpoint_without_its_graph_fails_with_one_line(copy: Path) -> None:
    (copy / "model.onnx").unlink()
    result = _load_without_torch(copy)
    assert result.returncode == 2, result.stderr
    (line,) = result.stdout.strip().splitlines()
    assert "digitflow export" in line
    assert str(copy) in line
