"""Classifier: batched prediction on preprocessed arrays; no HTTP knowledge.

One call per batch (ONNX Runtime runs it in slices of `SESSION_SLICE` images), by ONNX Runtime or
under `torch.inference_mode()` on a model in `eval()` mode, so the same image always gets the
same answer. The serving layer, the CLI's batch prediction and the benchmarks all go through
this class.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from digitflow.artifacts.run_layout import INT8_ONNX_FILENAME, ONNX_FILENAME
from digitflow.errors import ConfigError
from digitflow.inference import onnx_export, served_graph

if TYPE_CHECKING:  # torch is imported only when a model has to be built or exported
    import torch

    from digitflow.training.net import Net

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "onnx-int8")
# Most images in one ONNX Runtime run. Its arena keeps, for the worker's life, room for the
# largest batch it has seen (and more for each new batch size): ~26 MiB per worker at 64 images
# of mixed sizes, ~7 MiB in slices of 16. The forward's speed per image is the same (measured
# on 2 cores, one thread per worker: 64 images in one run or in four, within noise).
SESSION_SLICE = 16


@dataclass(frozen=True)
class Prediction:
    """The predicted digit and the probability of each of the ten classes."""

    label: int
    probabilities: tuple[float, ...]


def _logged_session(checkpoint: Path, num_threads: int, int8: bool = False) -> Any | None:
    """A session on the `model.onnx` (or `model.int8.onnx`) logged beside `checkpoint`, if it is
    there and vouched for."""
    graph = served_graph.logged_graph(checkpoint, int8=int8)
    name = INT8_ONNX_FILENAME if int8 else ONNX_FILENAME
    if graph is None:
        if int8:
            logger.warning("no checked %s beside %s; serving the float graph", name, checkpoint)
        return None
    try:
        session = onnx_export.onnx_session(graph, num_threads)
    except Exception as exc:  # ORT raises its own types for a graph it cannot load
        logger.warning("cannot load %s (%s); not using it", name, type(exc).__name__)
        return None
    logger.info("loaded %s logged beside %s", name, checkpoint)
    return session


class Classifier:
    """Runs the CNN on N×28×28 (or N×1×28×28) float32 arrays in [0, 1].

    Either eager PyTorch (`model`) or an ONNX Runtime session (`session`, on the graph `backend`
    names: `onnx` or `onnx-int8`) does the forward pass.
    """

    def __init__(
        self,
        model: Net | None = None,
        device: torch.device | None = None,
        session: Any = None,
        backend: str = "onnx",
    ) -> None:
        if model is None and session is None:
            raise ValueError("a Classifier needs a model or an ONNX Runtime session")
        if model is not None:
            model = model.to(device) if device is not None else model
            model.eval()
        self.model = model
        self.device = device
        self._session = session
        self.backend = backend if session is not None else "torch"

    @classmethod
    def from_checkpoint(
        cls,
        path: Path,
        device: torch.device | None = None,
        backend: str = "torch",
        num_threads: int | None = None,
        cache_dir: Path | None = None,
    ) -> Classifier:
        """Load the checkpoint at `path` safely (see `checkpoint.load_model`).

        `backend` names the engine (`torch`, `onnx` or `onnx-int8`); `num_threads` caps intra-op
        threads; `cache_dir` is where ONNX exports are kept (see `onnx_export`). With `onnx` on
        the CPU, the graph logged beside the checkpoint (`model.onnx`, see `served_graph`) is
        served; else an export of this exact checkpoint (by SHA-256) from the cache; torch is
        imported only to export when neither exists (a slim install without torch says so in
        one line). `onnx-int8` serves the run's checked int8 graph (`model.int8.onnx`), and the
        float graph as `onnx` does when the run has none.
        """
        if backend not in BACKENDS:
            raise ConfigError(
                f"unknown inference backend {backend!r}; known: {', '.join(BACKENDS)}"
            )
        path = Path(path)
        on_cpu = device is None or device.type == "cpu"
        use_onnx = backend != "torch" and on_cpu and path.is_file()
        name, folder = "", None
        if use_onnx and backend == "onnx-int8":
            session = _logged_session(path, num_threads or 1, int8=True)
            if session is not None:
                return cls(session=session, backend="onnx-int8")
        if use_onnx:
            session = _logged_session(path, num_threads or 1)
            if session is not None:  # the run's own graph: no cache looked up, no digest taken
                return cls(session=session)
            name = onnx_export.export_name(path)
            folder = onnx_export.private_folder(cache_dir)
            session = onnx_export.cached_session(folder, name, num_threads or 1)
            if session is not None:
                return cls(session=session)
        try:
            import torch
        except ImportError:
            raise ConfigError(
                f"{path.parent} has no {ONNX_FILENAME} exported from this {path.name}, and "
                f"exporting one needs torch, which this install lacks: run `digitflow export "
                f"{path.parent}` where torch is installed (pip install 'digitflow[train]'), "
                "or serve it with the full image (make image-full)"
            ) from None

        from digitflow.training.checkpoint import load_model

        if num_threads:
            torch.set_num_threads(num_threads)
        device = device or torch.device("cpu")
        model = load_model(path, device)
        if use_onnx:
            exported = onnx_export.export_model(model, folder, name)
            return cls(session=onnx_export.onnx_session(exported, num_threads or 1))
        if backend != "torch":
            logger.info("ONNX Runtime runs on the CPU here; using PyTorch on %s", device)
        return cls(model, device)

    def log_probabilities(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """N×10 log-probabilities for a batch: one forward pass, or with ONNX Runtime one per
        `SESSION_SLICE` images."""
        array = np.ascontiguousarray(batch, dtype=np.float32).reshape(-1, 1, 28, 28)
        if self._session is not None:
            slices = [
                self._session.run(None, {"images": array[start : start + SESSION_SLICE]})[0]
                for start in range(0, max(len(array), 1), SESSION_SLICE)  # one run if empty
            ]
            return np.asarray(np.concatenate(slices) if len(slices) > 1 else slices[0], np.float32)
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
