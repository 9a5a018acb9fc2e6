"""The int8 twin of a run's ONNX graph: calibrated on training images, kept if it answers alike.

ONNX Runtime's static quantization in QDQ form (int8 weights, uint8 activations, per-tensor
scales calibrated on training images, never held-out ones) runs the CNN ~2.7× faster on this CPU.
It is kept, as `model.int8.onnx` beside `model.onnx`, only when on the held-out split its classes
agree with the float graph's on at least `MIN_AGREEMENT` of the images, its accuracy is within
`MAX_ACCURACY_DROP` of the float graph's, and it gives every golden image its logged answer (so a
server's start-up self-test passes on it). The figures are written into `MLmodel`.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from digitflow.errors import DataNotFound
from digitflow.inference import onnx_export

if TYPE_CHECKING:
    from digitflow.data.mnist import DigitSet

logger = logging.getLogger(__name__)

MIN_AGREEMENT: Final = 0.995  # share of held-out images given the float graph's class
MAX_ACCURACY_DROP: Final = 0.002  # 0.2 percentage points of held-out accuracy, either way
CALIBRATION_IMAGES: Final = 300
_CALIBRATION_BATCH: Final = 32

FloatImages = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]


@dataclass(frozen=True)
class CheckImages:
    """What an int8 graph is made and judged on: training images to calibrate on, the held-out
    split with its labels, and the golden images with the answers logged for them."""

    calibration: FloatImages
    held_out: FloatImages
    labels: Labels
    golden: FloatImages = field(default_factory=lambda: np.empty((0, 1, 28, 28), np.float32))
    golden_answers: Labels = field(default_factory=lambda: np.empty(0, np.int64))


def split_check_images(train: DigitSet, test: DigitSet) -> CheckImages:
    """Calibrate on `CALIBRATION_IMAGES` training images spread over the split; judge on `test`."""
    return CheckImages(
        calibration=train.subset(CALIBRATION_IMAGES).images.numpy(),
        held_out=test.images.numpy(),
        labels=test.labels.numpy().astype(np.int64),
    )


def load_check_images(data_dir: Path) -> CheckImages | None:
    """`split_check_images` of the PNGs in `data_dir`; None (logged) when they are not there."""
    from digitflow.data.mnist import load_split

    try:
        return split_check_images(load_split(data_dir, "train"), load_split(data_dir, "test"))
    except DataNotFound as exc:
        logger.warning("no int8 graph: %s", exc)
        return None


@dataclass(frozen=True)
class Int8Check:
    """How the int8 graph compared with the float one on the held-out split."""

    images: int
    agreement: float
    float_accuracy: float
    int8_accuracy: float
    golden_disagreements: int
    calibration_images: int

    def failures(self) -> list[str]:
        """Why the graph may not be served; empty when it passed."""
        reasons = []
        if self.agreement < MIN_AGREEMENT:
            reasons.append(f"classes agree on {self.agreement:.2%} (< {MIN_AGREEMENT:.1%})")
        drop = abs(self.float_accuracy - self.int8_accuracy)
        if drop > MAX_ACCURACY_DROP + 1e-12:
            reasons.append(
                f"accuracy {self.int8_accuracy:.2%} vs {self.float_accuracy:.2%} float "
                f"(> {MAX_ACCURACY_DROP * 100:.1f} pp apart)"
            )
        if self.golden_disagreements:
            reasons.append(f"{self.golden_disagreements} golden images get another answer")
        return reasons

    def as_metadata(self) -> dict[str, float | int]:
        """The figures recorded in `MLmodel` beside the int8 graph's digest."""
        return {
            "held_out_images": self.images,
            "agreement": round(self.agreement, 6),
            "float_accuracy": round(self.float_accuracy, 6),
            "int8_accuracy": round(self.int8_accuracy, 6),
            "calibration_images": self.calibration_images,
        }


def _not_from_ort(record: logging.LogRecord) -> bool:
    return "onnxruntime" not in record.pathname


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ORT's quantizer logs advice on the root logger itself; keep it out of the run's output
    (a filter on a logger sees only records logged there, not those of other loggers)."""
    root = logging.getLogger()
    root.addFilter(_not_from_ort)
    try:
        yield
    finally:
        root.removeFilter(_not_from_ort)


def quantize(graph: bytes, calibration: FloatImages) -> bytes:
    """Static int8 (QDQ) version of `graph`, calibrated on `calibration` ([N,1,28,28] in [0, 1])."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Batches(CalibrationDataReader):  # type: ignore[misc]  # ORT ships no type hints
        def __init__(self) -> None:
            self._batches = (
                {"images": calibration[i : i + _CALIBRATION_BATCH]}
                for i in range(0, len(calibration), _CALIBRATION_BATCH)
            )

        def get_next(self) -> dict[str, Any] | None:
            return next(self._batches, None)

    with tempfile.TemporaryDirectory(prefix="digitflow-int8-") as tmp, _quiet_quantizer():
        source, target = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(graph)
        quantize_static(
            source,
            target,
            Batches(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        return target.read_bytes()


def classes(graph: bytes, images: FloatImages) -> Labels:
    """The class each image gets from `graph`."""
    if not len(images):
        return np.empty(0, dtype=np.int64)
    (log_probabilities,) = onnx_export.onnx_session(graph, 1).run(None, {"images": images})
    labels: Labels = np.asarray(log_probabilities).argmax(axis=1).astype(np.int64)
    return labels


def check_int8(float_graph: bytes, int8_graph: bytes, data: CheckImages) -> Int8Check:
    """Compare the two graphs on the held-out split and the golden images."""
    reference = classes(float_graph, data.held_out)
    # One int8 session for both sets: the held-out images, then the golden ones.
    both = classes(int8_graph, np.concatenate([data.held_out, data.golden]))
    predicted, golden = both[: len(data.held_out)], both[len(data.held_out) :]
    return Int8Check(
        images=len(data.held_out),
        agreement=float(np.mean(predicted == reference)) if len(reference) else 0.0,
        float_accuracy=float(np.mean(reference == data.labels)) if len(reference) else 0.0,
        int8_accuracy=float(np.mean(predicted == data.labels)) if len(reference) else 0.0,
        golden_disagreements=int((golden != data.golden_answers).sum()),
        calibration_images=len(data.calibration),
    )


def checked_int8(float_graph: bytes, data: CheckImages) -> tuple[bytes | None, Int8Check | None]:
    """The int8 graph and its check when it passed; (None, check) when it did not, with the reasons
    logged; (None, None) when there are no images to calibrate on or check against."""
    if not len(data.calibration) or not len(data.held_out):
        logger.info("no training or held-out images: no int8 graph")
        return None, None
    graph = quantize(float_graph, data.calibration)
    check = check_int8(float_graph, graph, data)
    reasons = check.failures()
    if reasons:
        logger.warning("not keeping the int8 graph: %s", "; ".join(reasons))
        return None, check
    return graph, check
