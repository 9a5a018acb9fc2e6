"""Classifier: batched prediction on preprocessed arrays; no HTTP knowledge.

One forward pass per batch, by ONNX Runtime or under `torch.inference_mode()` on a model in
`eval()` mode, so the same image always gets the same answer. The serving layer, the CLI's
batch prediction and the benchmarks all go through this class.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from digitflow import paths
from digitflow.errors import ConfigError

if TYPE_CHECKING:  # torch is imported only when a model has to be built or exported
    import torch

    from digitflow.model import Net

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx")


@dataclass(frozen=True)
class Prediction:
    """The predicted digit and the probability of each of the ten classes."""

    label: int
    probabilities: tuple[float, ...]


class Classifier:
    """Runs the CNN on N×28×28 (or N×1×28×28) float32 arrays in [0, 1].

    Either eager PyTorch (`model`) or an ONNX Runtime session (`session`) does the forward pass.
    """

    def __init__(
        self, model: Net | None = None, device: torch.device | None = None, session: Any = None
    ) -> None:
        if model is None and session is None:
            raise ValueError("a Classifier needs a model or an ONNX Runtime session")
        if model is not None:
            model = model.to(device) if device is not None else model
            model.eval()
        self.model = model
        self.device = device
        self._session = session
        self.backend = "onnx" if session is not None else "torch"

    @classmethod
    def from_checkpoint(
        cls,
        path: Path,
        device: torch.device | None = None,
        backend: str = "torch",
        num_threads: int | None = None,
    ) -> Classifier:
        """Load the checkpoint at `path` safely (see `checkpoint.load_model`).

        `backend` names the engine (`torch` or `onnx`); `num_threads` caps intra-op threads.
        With `onnx` on the CPU and an export of this exact checkpoint (by SHA-256) in the cache,
        torch is never imported: each server worker saves ~250 MB of memory.
        """
        if backend not in BACKENDS:
            raise ConfigError(f"unknown inference backend {backend!r}; known: torch, onnx")
        path = Path(path)
        on_cpu = device is None or device.type == "cpu"
        onnx_name = _onnx_name(path) if backend == "onnx" and on_cpu and path.is_file() else None
        if onnx_name is not None:
            cached = _cached_onnx(onnx_name)
            if cached is not None:
                return cls(session=_onnx_session(cached, num_threads or 1))
        import torch

        from digitflow.checkpoint import load_model

        if num_threads:
            torch.set_num_threads(num_threads)
        device = device or torch.device("cpu")
        model = load_model(path, device)
        if onnx_name is not None:
            session = _onnx_session(_export_onnx(model, path, onnx_name), num_threads or 1)
            return cls(session=session)
        if backend == "onnx":
            logger.info("ONNX Runtime runs on the CPU here; using PyTorch on %s", device)
        return cls(model, device)

    def log_probabilities(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """N×10 log-probabilities for a batch, in one forward pass."""
        array = np.ascontiguousarray(batch, dtype=np.float32).reshape(-1, 1, 28, 28)
        if self._session is not None:
            (output_array,) = self._session.run(None, {"images": array})
            return np.asarray(output_array, dtype=np.float32)
        import torch

        assert self.model is not None
        with torch.inference_mode():
            output = self.model(torch.from_numpy(array).to(self.device or "cpu"))
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


def _onnx_session(onnx_path: Path, num_threads: int) -> Any:
    """An ONNX Runtime CPU session with `num_threads` intra-op threads, run sequentially."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def _onnx_folders() -> list[Path]:
    return [paths.cache_dir() / "onnx", Path(tempfile.gettempdir()) / "digitflow-onnx"]


def _onnx_name(checkpoint: Path) -> str:
    """The export's file name, keyed by the checkpoint's SHA-256."""
    return f"model.{hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:16]}.onnx"


def _cached_onnx(name: str) -> Path | None:
    """The cached export called `name` (see `_onnx_name`), if this user has one."""
    for folder in _onnx_folders():
        candidate = folder / name
        # Only this user's exports: the temp-folder fallback is shared with other users.
        if candidate.is_file() and candidate.stat().st_uid == os.getuid():
            return candidate
    return None


def _export_onnx(model: Net, checkpoint: Path, name: str) -> Path:
    """Write the ONNX export of `model` (loaded from `checkpoint`) as `name`, atomically.

    In the user's cache (`paths.cache_dir()/onnx`), else the system temp folder; never beside
    the checkpoint, which may be an MLflow run's artifact folder or a verified pull.
    Uses the TorchScript exporter (`dynamo=False`): the dynamo one needs onnxscript.
    """
    import torch

    for folder in _onnx_folders():
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
                    model.cpu(),
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
