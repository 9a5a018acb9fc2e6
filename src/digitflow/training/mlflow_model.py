"""A run's `model/` folder as an MLflow Model: the ONNX graph, checked against torch, plus MLmodel.

The folder keeps the seed's `model.pt` and `golden.json` and gains `model.onnx` and an `MLmodel`
with the ONNX flavor and pyfunc, the tensor signature the server feeds (`images`: float32
[-1, 1, 28, 28] in [0, 1] → `log_probabilities`: float32 [-1, 10]), an input example and the
digests that let a server trust the graph (`served_graph.GraphRecord`). So
`mlflow models serve -m runs:/<uuid>/model` and `mlflow.pyfunc.load_model` work on every run.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import torch

from digitflow.artifacts.run_layout import (
    MLMODEL_FILENAME,
    MODEL_DIR,
    ONNX_FILENAME,
    golden_path,
)
from digitflow.artifacts.tracking import TrackingTarget
from digitflow.digests import file_sha256
from digitflow.errors import GraphMismatch
from digitflow.inference import onnx_export
from digitflow.inference.preprocess import bytes_to_input
from digitflow.inference.served_graph import GraphRecord
from digitflow.settings import StoreConfig
from digitflow.training.golden import GoldenImage, read_golden
from digitflow.training.net import Net

# ORT and torch sum in different orders: float32 round-off only, far below a class flip.
PROBABILITY_TOLERANCE: Final = 1e-4
CHECK_IMAGES_WITHOUT_GOLDEN: Final = 32
_REQUIREMENTS: Final = ("onnx", "onnxruntime", "numpy")
ONNX_DIGEST_TAG: Final = "digitflow.onnx_sha256"  # the run's tag naming model.onnx's SHA-256


def check_images(golden: Sequence[GoldenImage]) -> npt.NDArray[np.float32]:
    """The images the graph is checked on: the golden set, or fixed noise when there is none."""
    if golden:
        return np.stack([bytes_to_input(image.png) for image in golden])[:, None]
    noise = np.random.default_rng(0).random((CHECK_IMAGES_WITHOUT_GOLDEN, 1, 28, 28))
    return noise.astype(np.float32)


def check_graph(model: Net, graph: bytes, images: npt.NDArray[np.float32]) -> None:
    """Raise `GraphMismatch` unless the graph gives torch's classes and probabilities."""
    model = model.cpu().eval()
    with torch.inference_mode():
        expected = model(torch.from_numpy(images)).numpy()
    (got,) = onnx_export.onnx_session(graph, 1).run(None, {"images": images})
    flipped = int((expected.argmax(1) != got.argmax(1)).sum())
    drift = float(np.abs(np.exp(expected) - np.exp(got)).max())
    if flipped or drift > PROBABILITY_TOLERANCE:
        raise GraphMismatch(
            f"the ONNX export disagrees with torch on {flipped}/{len(images)} check images "
            f"(largest probability difference {drift:.2e}, tolerance {PROBABILITY_TOLERANCE})"
        )


def _signature() -> object:
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 28, 28), "images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10), "log_probabilities")]),
    )


def write_mlflow_model(
    checkpoint: Path, model: Net, golden: Sequence[GoldenImage]
) -> tuple[GraphRecord, list[Path]]:
    """Export `model` (loaded from `checkpoint`), check the graph and make the checkpoint's folder
    an MLflow Model; returns the digests recorded in its `MLmodel` and the files written there
    (an earlier export's files are replaced; the checkpoint and golden set are kept)."""
    import mlflow.onnx
    import onnx
    from mlflow.models import Model

    folder = checkpoint.parent
    written: list[Path] = []
    images = check_images(golden)
    graph = onnx_export.export_model(model, None, ONNX_FILENAME)
    with tempfile.TemporaryDirectory(prefix="digitflow-mlmodel-") as tmp:
        staged = Path(tmp) / "model"
        mlflow.onnx.save_model(
            onnx.load_from_string(graph),
            staged,
            signature=_signature(),
            input_example=images[:1],
            pip_requirements=[f"{name}=={version(name)}" for name in _REQUIREMENTS],
            onnx_execution_providers=["CPUExecutionProvider"],
            save_as_external_data=False,
        )
        saved = (staged / ONNX_FILENAME).read_bytes()
        check_graph(model, saved, images)
        record = GraphRecord(file_sha256(checkpoint), hashlib.sha256(saved).hexdigest())
        description = Model.load(str(staged / MLMODEL_FILENAME))
        description.metadata = {**(description.metadata or {}), **record.as_metadata()}
        description.save(str(staged / MLMODEL_FILENAME))
        # The graph before its description: a reader never sees an MLmodel naming a graph
        # that is not there yet (a mismatch only makes a server export again).
        for item in sorted(staged.iterdir(), key=lambda p: p.name == MLMODEL_FILENAME):
            target = folder / item.name
            if target.is_dir():
                shutil.rmtree(target)
            shutil.move(str(item), target)
            written.append(target)
    return record, written


def export_checkpoint(checkpoint: Path) -> GraphRecord:
    """`digitflow export PATH`: make the folder of a local checkpoint an MLflow Model."""
    from digitflow.training.checkpoint import load_model

    model = load_model(checkpoint)
    golden = read_golden(golden_path(checkpoint)) or []
    record, _ = write_mlflow_model(checkpoint, model, golden)
    return record


def export_run(run_id: str, store: StoreConfig, target: TrackingTarget) -> GraphRecord:
    """`digitflow export RUN`: pull the run, export its checkpoint, and log the new files to its
    `model/` artifact folder (and the graph's digest as a tag), so the run becomes an MLflow
    Model in place."""
    from digitflow.artifacts.pull import pull_run_artifacts
    from digitflow.training.checkpoint import load_model

    with tempfile.TemporaryDirectory(prefix="digitflow-export-") as tmp:
        pulled = pull_run_artifacts(run_id, Path(tmp), store)
        checkpoint = pulled.model_path
        golden = read_golden(golden_path(checkpoint)) or []
        record, written = write_mlflow_model(checkpoint, load_model(checkpoint), golden)
        client = target.client()
        for path in written:
            if path.is_dir():
                client.log_artifacts(run_id, str(path), f"{MODEL_DIR}/{path.name}")
            else:
                client.log_artifact(run_id, str(path), MODEL_DIR)
        client.set_tag(run_id, ONNX_DIGEST_TAG, record.onnx_sha256)
    return record
