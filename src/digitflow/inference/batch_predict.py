"""`digitflow predict`: the template's batch inference, through the server's decode + model path."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import numpy as np
from tqdm import tqdm

from digitflow.errors import InvalidImage
from digitflow.inference.classifier import Classifier
from digitflow.inference.preprocess import bytes_to_input

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


def iter_image_files(inputs: Iterable[Path]) -> Iterator[Path]:
    """Files as given, folders walked recursively (image suffixes only), in sorted order."""
    for path in inputs:
        if path.is_dir():
            yield from sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        else:
            yield path


def predict_files(
    classifier: Classifier,
    inputs: Iterable[Path],
    out: TextIO,
    batch_size: int = 256,
    progress: bool = True,
) -> int:
    """Write one JSON line per image; returns the number of images that could not be read."""
    files = list(iter_image_files(inputs))
    failures = 0
    bar = tqdm(total=len(files), unit="img", disable=not progress)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        good: list[tuple[Path, np.ndarray]] = []
        for path in chunk:
            try:
                good.append((path, bytes_to_input(path.read_bytes())))
            except (InvalidImage, OSError) as exc:
                failures += 1
                out.write(
                    json.dumps({"time": _now(), "image_filepath": str(path), "error": str(exc)})
                    + "\n"
                )
        if good:
            preds = classifier.predict(np.stack([arr for _, arr in good]).astype(np.float32))
            for (path, _), pred in zip(good, preds, strict=True):
                line = {"time": _now(), "image_filepath": str(path), "prediction": str(pred.label)}
                out.write(json.dumps(line) + "\n")
        bar.update(len(chunk))
    bar.close()
    return failures


def _now() -> str:
    return datetime.now(UTC).isoformat()
