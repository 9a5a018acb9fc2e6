"""Golden self-test: the loaded model must reproduce the answers logged beside its checkpoint."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digitflow.artifacts.run_layout import golden_path
from digitflow.errors import SelfTestFailed
from digitflow.inference.classifier import Classifier
from digitflow.inference.preprocess import bytes_to_input
from digitflow.training.golden import read_golden

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelfTestReport:
    """What the start-up check did: warm-up, and how many golden answers were reproduced."""

    golden_checked: int
    golden_file: Path | None
    warmed_up: bool = True


def run_self_test(classifier: Classifier, model_path: Path) -> SelfTestReport:
    """Warm up, then check every golden answer; raises SelfTestFailed naming the disagreements."""
    classifier.warm_up()
    path = golden_path(model_path)
    golden = read_golden(path)
    if golden is None:
        return SelfTestReport(golden_checked=0, golden_file=None)
    batch = np.stack([bytes_to_input(item.png) for item in golden])
    predictions = classifier.predict(batch)
    wrong = [
        f"{item.filepath} expected {item.prediction} got {pred.label}"
        for item, pred in zip(golden, predictions, strict=True)
        if str(pred.label) != item.prediction
    ]
    if wrong:
        raise SelfTestFailed(
            f"golden self-test failed for {model_path}: {len(wrong)}/{len(golden)} images "
            f"disagree: " + "; ".join(wrong[:10])
        )
    return SelfTestReport(golden_checked=len(golden), golden_file=path)


def worker_threads(explicit: int, workers: int | None, cores: int | None = None) -> int:
    """Intra-op threads per worker: `explicit` if > 0, else cores // workers (at least 1; no
    worker count means one worker)."""
    if explicit > 0:
        return explicit
    return max(1, (cores or os.cpu_count() or 1) // max(1, workers or 1))


def load_checked_classifier(
    model_path: Path,
    backend: str = "onnx",
    use_cuda: bool = False,
    use_mps: bool = False,
    num_threads: int = 1,
    cache_dir: Path | None = None,
) -> tuple[Classifier, SelfTestReport]:
    """Load the checkpoint, warm it up and prove it reproduces its golden answers.

    Raises a `DigitflowError` with one clear message (missing, corrupt or unsafe checkpoint) or
    `SelfTestFailed` (the loaded model disagrees with its run). Only a GPU request imports torch
    here; the ONNX path with a cached export never does.
    """
    device = None
    if use_cuda or use_mps:
        from digitflow.device import select_device

        device = select_device(use_cuda, use_mps)
    classifier = Classifier.from_checkpoint(
        model_path, device=device, backend=backend, num_threads=num_threads, cache_dir=cache_dir
    )
    return classifier, run_self_test(classifier, model_path)
