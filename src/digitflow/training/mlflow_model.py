"""A run's `model/` folder as an MLflow Model: the ONNX graph, checked against torch, plus MLmodel.

The folder keeps the seed's `model.pt` and `golden.json` and gains `model.onnx` and an `MLmodel`
with the ONNX flavor and pyfunc, the tensor signature the server feeds (`images`: float32
[-1, 1, 28, 28] in [0, 1] → `log_probabilities`: float32 [-1, 10]), an input example and the
digests that let a server trust the graph (`served_graph.GraphRecord`). So
`mlflow models serve -m runs:/<uuid>/model` and `mlflow.pyfunc.load_model` work on every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import torch

from digitflow.artifacts.run_layout import (
    INT8_ONNX_FILENAME,
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
from digitflow.training.quantize import CheckImages, Int8Check, checked_int8, load_check_images

# ORT and torch sum in different orders: float32 round-off only, far below a class flip.
PROBABILITY_TOLERANCE: Final = 1e-4
CHECK_IMAGES_WITHOUT_GOLDEN: Final = 32
_REQUIREMENTS: Final = ("onnx", "onnxruntime", "numpy")
ONNX_DIGEST_TAG: Final = "digitflow.onnx_sha256"  # the run's tag naming model.onnx's SHA-256
INT8_TAG: Final = "digitflow.int8"  # "kept" or "refused": did model.int8.onnx pass its check


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


@dataclass(frozen=True)
class Export:
    """What `write_mlflow_model` did: the digests it recorded, the files it wrote, and how the
    int8 graph compared with the float one (None when there were no images to judge it on)."""

    record: GraphRecord
    written: list[Path]
    int8_check: Int8Check | None


def write_mlflow_model(
    checkpoint: Path,
    model: Net,
    golden: Sequence[GoldenImage],
    check_data: CheckImages | None = None,
) -> Export:
    """Export `model` (loaded from `checkpoint`), check the graph and make the checkpoint's folder
    an MLflow Model. With `check_data`, also quantize the graph to int8 and keep it as
    `model.int8.onnx` when it passes its check (`training.quantize`). An earlier export's files
    are replaced; the checkpoint and golden set are kept."""
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
        int8, int8_check = None, None
        if check_data is not None:
            answers = np.array([int(image.prediction) for image in golden], dtype=np.int64)
            judged = dataclasses.replace(
                check_data, golden=images[: len(golden)], golden_answers=answers
            )
            int8, int8_check = checked_int8(saved, judged)
        record = GraphRecord(file_sha256(checkpoint), hashlib.sha256(saved).hexdigest())
        if int8 is not None and int8_check is not None:
            (staged / INT8_ONNX_FILENAME).write_bytes(int8)
            record = dataclasses.replace(
                record,
                int8_sha256=hashlib.sha256(int8).hexdigest(),
                int8_check=int8_check.as_metadata(),
            )
        (folder / INT8_ONNX_FILENAME).unlink(missing_ok=True)  # an earlier export's
        description = Model.load(str(staged / MLMODEL_FILENAME))
        description.metadata = {**(description.metadata or {}), **record.as_metadata()}
        description.save(str(staged / MLMODEL_FILENAME))
        # The graphs before their description: a reader never sees an MLmodel naming a graph
        # that is not there yet (a mismatch only makes a server export again).
        for item in sorted(staged.iterdir(), key=lambda p: p.name == MLMODEL_FILENAME):
            target = folder / item.name
            if target.is_dir():
                shutil.rmtree(target)
            shutil.move(str(item), target)
            written.append(target)
    return Export(record, written, int8_check)


def export_checkpoint(checkpoint: Path, data_dir: Path | None = None) -> Export:
    """`digitflow export PATH`: make the folder of a local checkpoint an MLflow Model (with the
    int8 graph when `data_dir` holds the training and held-out PNGs to calibrate and judge it)."""
    from digitflow.training.checkpoint import load_model

    model = load_model(checkpoint)
    golden = read_golden(golden_path(checkpoint)) or []
    data = load_check_images(data_dir) if data_dir is not None else None
    return write_mlflow_model(checkpoint, model, golden, data)


def export_run(
    run_id: str, store: StoreConfig, target: TrackingTarget, data_dir: Path | None = None
) -> Export:
    """`digitflow export RUN`: pull the run, export its checkpoint, and log the new files to its
    `model/` artifact folder (and the graph's digest as a tag), so the run becomes an MLflow
    Model in place."""
    from digitflow.artifacts.pull import pull_run_artifacts

    with tempfile.TemporaryDirectory(prefix="digitflow-export-") as tmp:
        pulled = pull_run_artifacts(run_id, Path(tmp), store)
        export = export_checkpoint(pulled.model_path, data_dir)
        client = target.client()
        for path in export.written:
            if path.is_dir():
                client.log_artifacts(run_id, str(path), f"{MODEL_DIR}/{path.name}")
            else:
                client.log_artifact(run_id, str(path), MODEL_DIR)
        client.set_tag(run_id, ONNX_DIGEST_TAG, export.record.onnx_sha256)
        if export.int8_check is not None:
            for name, value in int8_metrics(export.int8_check).items():
                client.log_metric(run_id, name, value)
            client.set_tag(run_id, INT8_TAG, int8_verdict(export.int8_check))
    return export


def int8_metrics(check: Int8Check) -> dict[str, float]:
    """The int8 check's figures as run metrics."""
    return {
        "int8_agreement": check.agreement,
        "int8_test_accuracy": check.int8_accuracy,
        "float_test_accuracy": check.float_accuracy,
    }


def int8_verdict(check: Int8Check) -> str:
    """The `INT8_TAG` value: was `model.int8.onnx` kept."""
    return "refused" if check.failures() else "kept"
