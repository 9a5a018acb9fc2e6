"""Golden self-test: the loaded model must reproduce the answers logged beside its checkpoint."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from digitflow.errors import SelfTestFailed
from digitflow.inference import Classifier
from digitflow.preprocess import bytes_to_input

logger = logging.getLogger(__name__)

GOLDEN_FILENAME = "golden.json"


def load_golden(model_path: Path) -> list[dict[str, Any]] | None:
    """The golden images beside `model_path`, or None when there is no golden.json."""
    golden_path = model_path.parent / GOLDEN_FILENAME
    if not golden_path.is_file():
        return None
    try:
        payload = json.loads(golden_path.read_text(encoding="utf-8"))
        images = payload["images"]
        if not isinstance(images, list):
            raise TypeError("images is not a list")
        return images
    except (ValueError, KeyError, TypeError) as exc:
        raise SelfTestFailed(f"{golden_path}: unreadable golden file ({exc})") from exc


def run_self_test(classifier: Classifier, model_path: Path) -> dict[str, Any]:
    """Warm up, then check every golden answer; returns what was checked, raises SelfTestFailed."""
    classifier.warm_up()
    golden = load_golden(model_path)
    if golden is None:
        return {"warmed_up": True, "golden_checked": 0, "golden_file": None}
    batch = np.stack([bytes_to_input(base64.b64decode(item["png_base64"])) for item in golden])
    predictions = classifier.predict(batch.astype(np.float32))
    wrong = [
        f"{item.get('filepath', i)} expected {item['prediction']} got {pred.label}"
        for i, (item, pred) in enumerate(zip(golden, predictions, strict=True))
        if str(pred.label) != str(item["prediction"])
    ]
    if wrong:
        raise SelfTestFailed(
            f"golden self-test failed for {model_path}: {len(wrong)}/{len(golden)} images "
            f"disagree: " + "; ".join(wrong[:10])
        )
    return {
        "warmed_up": True,
        "golden_checked": len(golden),
        "golden_file": str(model_path.parent / GOLDEN_FILENAME),
    }
