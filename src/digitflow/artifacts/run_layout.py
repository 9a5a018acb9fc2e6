"""Names of a run's artifacts and of a pulled run's folders: the one torch-free place for them.

A run's artifacts live at `<experiment artifact location>/<run uuid>/artifacts/...` in the store;
a pulled run lands in `<models dir>/<run uuid>/artifacts/...` beside a manifest of the pull.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

ARTIFACTS_DIR: Final = "artifacts"  # a run's artifact root, under its folder
MODEL_DIR: Final = "model"  # the artifact folder of the served model
CHECKPOINT_FILENAME: Final = "model.pt"
GOLDEN_FILENAME: Final = "golden.json"
# The served graph, exported once from the checkpoint, and the MLflow Model description (`MLmodel`)
# that names both files' SHA-256 digests: the folder `model/` is an MLflow Model (ONNX flavor).
ONNX_FILENAME: Final = "model.onnx"
INT8_ONNX_FILENAME: Final = "model.int8.onnx"  # the calibrated int8 twin of model.onnx
MLMODEL_FILENAME: Final = "MLmodel"
MODEL_ARTIFACT: Final = f"{MODEL_DIR}/{CHECKPOINT_FILENAME}"
GOLDEN_ARTIFACT: Final = f"{MODEL_DIR}/{GOLDEN_FILENAME}"
ONNX_ARTIFACT: Final = f"{MODEL_DIR}/{ONNX_FILENAME}"
CONFIG_ARTIFACT: Final = "train_model_config.json"
CHECKPOINTS_DIR: Final = "checkpoints"  # interval checkpoints: `checkpoints/epoch-<n>/model.pt`
MANIFEST_NAME: Final = ".digitflow-manifest.json"
# The embedded store under `mlruns/`: its SQLite file and the folder its runs' artifacts go to.
EMBEDDED_STORE_DB: Final = "mlflow.db"
EMBEDDED_ARTIFACT_ROOT: Final = "artifacts"

# `\Z`, not `$`: `$` also matches before a trailing newline.
RUN_ID_PATTERN: Final = re.compile(r"[0-9a-f]{32}\Z")
RUNS_URI_PATTERN: Final = re.compile(r"runs:/([0-9a-f]{32})(/.*)?\Z")


def is_run_id(text: str) -> bool:
    """True for exactly 32 lowercase hex digits (an MLflow run UUID)."""
    return RUN_ID_PATTERN.match(text) is not None


def run_dir(models_dir: Path, run_id: str) -> Path:
    """Where a pulled run lives: `<models_dir>/<run uuid>`."""
    return models_dir / run_id


def enclosing_run_dir(path: Path) -> Path | None:
    """The nearest folder above `path` named by a run UUID (`<run uuid>/...`), if any.

    The absolute path is searched as given, links not followed: a link named after its run
    still names the run.
    """
    return next((p for p in path.absolute().parents if is_run_id(p.name)), None)


def enclosing_run_id(path: Path) -> str | None:
    """The run UUID of the folder `path` sits in (see `enclosing_run_dir`), if any."""
    folder = enclosing_run_dir(path)
    return folder.name if folder is not None else None


def artifacts_dir(run_folder: Path) -> Path:
    """The `artifacts/` folder of a pulled run (or of a run in a local store)."""
    return run_folder / ARTIFACTS_DIR


def artifact_path(run_folder: Path, artifact: str) -> Path:
    """Where `artifact` (a path under the run's artifact root) lives in a run folder."""
    return artifacts_dir(run_folder) / artifact


def model_path(run_folder: Path) -> Path:
    """`<run folder>/artifacts/model/model.pt`: the file the server loads."""
    return artifact_path(run_folder, MODEL_ARTIFACT)


def golden_path(checkpoint: Path) -> Path:
    """The golden set logged beside a checkpoint."""
    return checkpoint.parent / GOLDEN_FILENAME


def onnx_path(checkpoint: Path) -> Path:
    """The ONNX graph exported from a checkpoint, beside it."""
    return checkpoint.parent / ONNX_FILENAME


def int8_onnx_path(checkpoint: Path) -> Path:
    """The calibrated int8 graph of a checkpoint, beside it (only when it passed its check)."""
    return checkpoint.parent / INT8_ONNX_FILENAME


def mlmodel_path(checkpoint: Path) -> Path:
    """The `MLmodel` file of the MLflow Model folder a checkpoint sits in."""
    return checkpoint.parent / MLMODEL_FILENAME


def companion_files(checkpoint: Path) -> list[Path]:
    """The files beside a checkpoint that belong to it: golden set, ONNX graphs, MLmodel."""
    return [
        golden_path(checkpoint),
        onnx_path(checkpoint),
        int8_onnx_path(checkpoint),
        mlmodel_path(checkpoint),
    ]


def interval_checkpoint_dir(epoch: int) -> str:
    """The artifact folder of the checkpoint saved after `epoch` (not the final one)."""
    return f"{CHECKPOINTS_DIR}/epoch-{epoch}"
