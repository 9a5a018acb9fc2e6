"""Classifier: batched prediction on preprocessed arrays; no HTTP knowledge.

One forward pass per batch under `torch.inference_mode()` on a model in `eval()` mode, so the same
image always gets the same answer. The serving layer, the CLI's batch prediction and the
benchmarks all go through this class.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from digitflow import paths
from digitflow.checkpoint import load_model
from digitflow.errors import ConfigError
from digitflow.model import Net


@dataclass(frozen=True)
class Prediction:
    """The predicted digit and the probability of each of the ten classes."""

    label: int
    probabilities: tuple[float, ...]


class Classifier:
    """Runs `Net` on N×28×28 (or N×1×28×28) float32 arrays in [0, 1]."""

    def __init__(self, model: Net, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.model = model.to(self.device).eval()
        self.backend = "torch"
        self._session: Any = None

    @classmethod
    def from_checkpoint(
        cls,
        path: Path,
        device: torch.device | None = None,
        backend: str = "torch",
        num_threads: int | None = None,
    ) -> Classifier:
        """Load the checkpoint at `path` safely (see `checkpoint.load_model`).

        `backend` names the engine (`torch` for now); `num_threads` caps intra-op threads.
        """
        if backend not in ("torch", "onnx"):
            raise ConfigError(f"unknown inference backend {backend!r}; known: torch, onnx")
        if num_threads:
            torch.set_num_threads(num_threads)
        device = device or torch.device("cpu")
        classifier = cls(load_model(path, device), device)
        if backend == "onnx":
            classifier._use_onnx(Path(path), num_threads or 1)
        return classifier

    def _use_onnx(self, checkpoint: Path, num_threads: int) -> None:
        """Export the model to ONNX (cached by checkpoint hash) and run it with onnxruntime."""
        import onnxruntime as ort

        onnx_path = _export_onnx(self.model.cpu(), checkpoint)
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )
        self.backend = "onnx"

    def log_probabilities(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """N×10 log-probabilities for a batch, in one forward pass."""
        array = np.ascontiguousarray(batch, dtype=np.float32).reshape(-1, 1, 28, 28)
        if self._session is not None:
            (output_array,) = self._session.run(None, {"images": array})
            return np.asarray(output_array, dtype=np.float32)
        with torch.inference_mode():
            output = self.model(torch.from_numpy(array).to(self.device))
        return np.asarray(output.cpu().numpy(), dtype=np.float32)

    def predict(self, batch: npt.NDArray[np.float32]) -> list[Prediction]:
        """One `Prediction` per image of the batch, in order."""
        log_probs = self.log_probabilities(batch)
        rows: list[list[float]] = np.exp(log_probs).tolist()
        labels: list[int] = log_probs.argmax(axis=1).tolist()
        return [
            Prediction(label=label, probabilities=tuple(row))
            for label, row in zip(labels, rows, strict=True)
        ]

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8, 64)) -> None:
        """Run a few blank batches so the first request does not pay for allocation."""
        for size in batch_sizes:
            self.log_probabilities(np.zeros((size, 28, 28), dtype=np.float32))


def _export_onnx(model: Net, checkpoint: Path) -> Path:
    """Path of the ONNX export of `model`, keyed by the checkpoint's SHA-256, written atomically.

    In the user's cache (`paths.cache_dir()/onnx`), else the system temp folder; never beside
    the checkpoint, which may be an MLflow run's artifact folder or a verified pull.
    Uses the TorchScript exporter (`dynamo=False`): the dynamo one needs onnxscript.
    """
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:16]
    name = f"model.{digest}.onnx"
    folders = [paths.cache_dir() / "onnx", Path(tempfile.gettempdir()) / "digitflow-onnx"]
    for folder in folders:
        target = folder / name
        if target.is_file():
            return target
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        except OSError:
            continue
        os.close(fd)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model,
                    (torch.zeros(1, 1, 28, 28),),
                    tmp,
                    dynamo=False,
                    input_names=["images"],
                    output_names=["log_probabilities"],
                    dynamic_axes={"images": {0: "n"}, "log_probabilities": {0: "n"}},
                )
            os.replace(tmp, folder / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return folder / name
    raise ConfigError(f"cannot write the ONNX export of {checkpoint} anywhere")
