"""The default model reads phone photos (each condition) and canvas drawings of HELD-OUT digits.

The photos and drawings are rendered by `digitflow.data.photo_synth` from the test split only, the
way `benchmarks/photos.py` builds its benchmark (its full figures are in docs/photos.md).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digitflow import paths
from digitflow.data.mnist import read_annotations
from digitflow.data.photo_synth import CONDITIONS, render_drawing, render_photo
from digitflow.inference.classifier import Classifier
from digitflow.inference.preprocess import bytes_to_input
from digitflow.training.default_model import ensure_default_model
from digitflow.training.quantize import MAX_ACCURACY_DROP, MIN_AGREEMENT

PER_CONDITION = 60
PHOTOS_PER_CONDITION = 100  # int8 check: 6 photo conditions and drawings, 700 images


@pytest.fixture(scope="module")
def default_checkpoint(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model `make serve` trains with nothing configured (the default config, ~3 min)."""
    mlruns = tmp_path_factory.mktemp("default-mlruns")
    model = ensure_default_model(paths.DEFAULT_TRAIN_CONFIG, data_dir, mlruns, progress=False)
    return model.model_path


@pytest.fixture(scope="module")
def default_classifier(default_checkpoint: Path) -> Classifier:
    return Classifier.from_checkpoint(default_checkpoint)


@pytest.fixture(scope="module")
def held_out(data_dir: Path) -> list[tuple[np.ndarray, int]]:
    with (data_dir / "test.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    digits = []
    for row in rows[::5]:
        with Image.open(data_dir / row["filepath"]) as image:
            digits.append((np.asarray(image.convert("L"), dtype=np.uint8), int(row["label"])))
    return digits


def _accuracy(classifier: Classifier, blobs: list[bytes], labels: list[int]) -> float:
    predictions = classifier.predict(np.stack([bytes_to_input(b) for b in blobs]))
    return float(np.mean([p.label == y for p, y in zip(predictions, labels, strict=True)]))


@pytest.mark.slow
@pytest.mark.parametrize("condition", CONDITIONS)
def test_the_default_model_reads_at_least_90_percent_of_photos_in_each_condition(
    default_classifier: Classifier, held_out: list[tuple[np.ndarray, int]], condition: str
) -> None:
    rng = np.random.default_rng(100 + CONDITIONS.index(condition))
    sample = held_out[:PER_CONDITION]
    blobs = [render_photo(digit, condition, rng) for digit, _ in sample]
    accuracy = _accuracy(default_classifier, blobs, [label for _, label in sample])
    print(f"{condition}: {accuracy:.3f}")
    assert accuracy >= 0.90


@pytest.mark.slow
def test_the_default_model_reads_canvas_drawings_on_a_transparent_background(
    default_classifier: Classifier, held_out: list[tuple[np.ndarray, int]]
) -> None:
    rng = np.random.default_rng(7)
    sample = held_out[:100]
    blobs = [render_drawing(digit, rng) for digit, _ in sample]
    with Image.open(io.BytesIO(blobs[0])) as first:
        assert first.mode == "RGBA" and first.size == (280, 280)
        assert first.getchannel("A").getextrema()[0] == 0  # transparent background
    accuracy = _accuracy(default_classifier, blobs, [label for _, label in sample])
    print(f"drawn: {accuracy:.3f}")
    assert accuracy >= 0.95


@pytest.mark.slow
def test_the_default_model_s_int8_graph_keeps_accuracy_and_classes_on_held_out_pngs_and_photos(
    default_checkpoint: Path, data_dir: Path, held_out: list[tuple[np.ndarray, int]]
) -> None:
    # The bar for serving an int8 graph: within 0.2 pp of the float graph's accuracy and
    # the same class on at least 99.5 % of images, on the held-out PNGs and on photos.
    rows = read_annotations(data_dir, "test")
    sets = {"held-out PNGs": ([(data_dir / p).read_bytes() for p, _ in rows], [y for _, y in rows])}
    rng = np.random.default_rng(2027)
    photos: list[bytes] = []
    labels: list[int] = []
    for condition in CONDITIONS:
        for digit, label in held_out[:PHOTOS_PER_CONDITION]:
            photos.append(render_photo(digit, condition, rng))
            labels.append(label)
    for digit, label in held_out[:PHOTOS_PER_CONDITION]:
        photos.append(render_drawing(digit, rng))
        labels.append(label)
    sets["photos and drawings"] = (photos, labels)
    float_graph = Classifier.from_checkpoint(default_checkpoint, backend="onnx")
    int8_graph = Classifier.from_checkpoint(default_checkpoint, backend="onnx-int8")
    assert int8_graph.backend == "onnx-int8"
    for name, (blobs, truth) in sets.items():
        inputs = np.stack([bytes_to_input(blob) for blob in blobs])
        reference = float_graph.log_probabilities(inputs).argmax(1)
        predicted = int8_graph.log_probabilities(inputs).argmax(1)
        agreement = float(np.mean(predicted == reference))
        drop = float(np.mean(reference == truth)) - float(np.mean(predicted == truth))
        print(f"{name} ({len(blobs)}): agreement {agreement:.4f}, accuracy drop {drop:+.4f}")
        assert agreement >= MIN_AGREEMENT, name
        assert abs(drop) <= MAX_ACCURACY_DROP + 1e-9, name
