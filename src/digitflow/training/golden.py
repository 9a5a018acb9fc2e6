"""The golden set: held-out images logged with a run's own answers, written and read here only.

Format 1 (`model/golden.json`): `{"format": 1, "images": [{"filepath", "label", "prediction",
"png_base64"}, ...]}`. A server loading the checkpoint must reproduce every `prediction`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from digitflow.errors import SelfTestFailed

GOLDEN_FORMAT = 1


@dataclass(frozen=True)
class GoldenImage:
    """One held-out image and the answer the trained model gave it."""

    filepath: str
    label: int
    prediction: str
    png: bytes


def write_golden(path: Path, images: Sequence[GoldenImage]) -> None:
    """Write `images` as a golden file at `path`."""
    payload = {
        "format": GOLDEN_FORMAT,
        "images": [
            {
                "filepath": image.filepath,
                "label": image.label,
                "prediction": image.prediction,
                "png_base64": base64.b64encode(image.png).decode(),
            }
            for image in images
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload), encoding="utf-8")


def read_golden(path: Path) -> list[GoldenImage] | None:
    """The golden images at `path`; None when there is no file; `SelfTestFailed` when malformed."""
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        entries = payload["images"]
        if not isinstance(entries, list):
            raise TypeError("images is not a list")
        return [
            GoldenImage(
                filepath=str(entry.get("filepath", index)),
                label=int(entry.get("label", -1)),
                prediction=str(entry["prediction"]),
                png=base64.b64decode(entry["png_base64"], validate=True),
            )
            for index, entry in enumerate(entries)
        ]
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise SelfTestFailed(
            f"{path}: unreadable golden file ({type(exc).__name__}: {str(exc)[:100]})"
        ) from None
