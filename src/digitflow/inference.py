"""Classifier: batched prediction on preprocessed arrays; no HTTP knowledge.

One forward pass per batch under `torch.inference_mode()` on a model in `eval()` mode, so the same
image always gets the same answer. The serving layer, the CLI's batch prediction and the
benchmarks all go through this class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

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
        if backend != "torch":
            raise ConfigError(f"unknown inference backend {backend!r}; known: torch")
        if num_threads:
            torch.set_num_threads(num_threads)
        device = device or torch.device("cpu")
        return cls(load_model(path, device), device)

    def log_probabilities(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """N×10 log-probabilities for a batch, in one forward pass."""
        array = np.ascontiguousarray(batch, dtype=np.float32).reshape(-1, 1, 28, 28)
        with torch.inference_mode():
            output = self.model(torch.from_numpy(array).to(self.device))
        return np.asarray(output.cpu().numpy(), dtype=np.float32)

    def predict(self, batch: npt.NDArray[np.float32]) -> list[Prediction]:
        """One `Prediction` per image of the batch, in order."""
        log_probs = self.log_probabilities(batch)
        probs = np.exp(log_probs)
        labels = log_probs.argmax(axis=1)
        return [
            Prediction(label=int(label), probabilities=tuple(float(p) for p in row))
            for label, row in zip(labels, probs, strict=True)
        ]

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8, 64)) -> None:
        """Run a few blank batches so the first request does not pay for allocation."""
        for size in batch_sizes:
            self.log_probabilities(np.zeros((size, 28, 28), dtype=np.float32))
