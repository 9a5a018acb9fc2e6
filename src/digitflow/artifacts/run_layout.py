"""Names of a run's artifacts and of a pulled run's folders: the one torch-free place for them.

A run's artifacts live at `<experiment artifact location>/<run uuid>/artifacts/...` in the store;
a pulled run lands in `<models dir>/<run uuid>/artifacts/...` beside a manifest of the pull.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

MODEL_ARTIFACT: Final = "model/model.pt"
GOLDEN_ARTIFACT: Final = "model/golden.json"
CONFIG_ARTIFACT: Final = "train_model_config.json"
GOLDEN_FILENAME: Final = "golden.json"
MANIFEST_NAME: Final = ".digitflow-manifest.json"

# `\Z`, not `$`: `$` also matches before a trailing newline.
RUN_ID_PATTERN: Final = re.compile(r"[0-9a-f]{32}\Z")
RUNS_URI_PATTERN: Final = re.compile(r"runs:/([0-9a-f]{32})(/.*)?\Z")


def is_run_id(text: str) -> bool:
    """True for exactly 32 lowercase hex digits (an MLflow run UUID)."""
    return RUN_ID_PATTERN.match(text) is not None


def run_dir(models_dir: Path, run_id: str) -> Path:
    """Where a pulled run lives: `<models_dir>/<run uuid>`."""
    return models_dir / run_id


def artifacts_dir(run_folder: Path) -> Path:
    """The `artifacts/` folder of a pulled run (or of a run in a local store)."""
    return run_folder / "artifacts"


def model_path(run_folder: Path) -> Path:
    """`<run folder>/artifacts/model/model.pt`: the file the server loads."""
    return artifacts_dir(run_folder) / MODEL_ARTIFACT


def golden_path(checkpoint: Path) -> Path:
    """The golden set logged beside a checkpoint."""
    return checkpoint.parent / GOLDEN_FILENAME
