"""Photos of dark digits on light paper (a proxy built from MNIST test digits) are recognised."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from digitflow.inference.classifier import Classifier
from digitflow.inference.preprocess import bytes_to_input
from tests.support.gunicorn_server import TrainedModel

pytestmark = pytest.mark.slow  # starts real servers or trains a model

COUNT = 300


def as_photo(
    path: Path, rng: np.random.Generator, fmt: str, sizes: tuple[int, int] = (200, 301)
) -> bytes:
    """An MNIST digit drawn dark on uneven light paper (200–300 px), noisy, blurred, off-centre."""
    with Image.open(path) as img:
        digit = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    size = int(rng.integers(*sizes))
    scale = size / 28 * float(rng.uniform(0.6, 0.9))
    big = Image.fromarray((digit * 255).astype(np.uint8)).resize(
        (int(28 * scale), int(28 * scale)), Image.Resampling.BICUBIC
    )
    ink = np.zeros((size, size), dtype=np.float32)
    off = size - big.width
    x, y = (int(rng.integers(0, off + 1)) for _ in range(2))
    ink[y : y + big.height, x : x + big.width] = np.asarray(big, dtype=np.float32) / 255.0
    gradient = np.linspace(0, 1, size, dtype=np.float32)[None, :] * float(rng.uniform(-25, 25))
    paper = float(rng.uniform(200, 245)) + gradient + rng.normal(0, 6, (size, size))
    pen = float(rng.uniform(10, 70))
    photo = paper * (1 - ink) + pen * ink
    image = Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8))
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
    if rng.random() < 0.5:
        image = image.convert("RGB")
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, format="JPEG", quality=int(rng.integers(60, 90)))
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_photos_of_dark_digits_on_light_paper_are_recognised_at_least_80_percent(
    trained_model: TrainedModel, data_dir: Path, fmt: str
) -> None:
    with (data_dir / "test.csv").open() as f:
        rows = [(data_dir / r["filepath"], int(r["label"])) for r in csv.DictReader(f)][:COUNT]
    rng = np.random.default_rng(7)
    inputs = np.stack([bytes_to_input(as_photo(p, rng, fmt)) for p, _ in rows])
    predictions = Classifier.from_checkpoint(trained_model.model_path).predict(inputs)
    accuracy = float(
        np.mean([p.label == label for p, (_, label) in zip(predictions, rows, strict=True)])
    )
    print(f"{fmt} photo proxy accuracy: {accuracy:.3f} on {COUNT}")
    assert accuracy >= 0.80


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_big_photos_are_recognised_too(
    trained_model: TrainedModel, data_dir: Path, fmt: str
) -> None:
    # 1,100-2,000 px: reduced (JPEG: decoded at 1/2-1/8 scale) before normalising.
    with (data_dir / "test.csv").open() as f:
        rows = [(data_dir / r["filepath"], int(r["label"])) for r in csv.DictReader(f)][:20]
    rng = np.random.default_rng(11)
    inputs = np.stack([bytes_to_input(as_photo(p, rng, fmt, (1100, 2001))) for p, _ in rows])
    predictions = Classifier.from_checkpoint(trained_model.model_path).predict(inputs)
    right = sum(p.label == label for p, (_, label) in zip(predictions, rows, strict=True))
    assert right >= 16  # at least 80 %
