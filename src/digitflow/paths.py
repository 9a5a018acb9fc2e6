"""Where the project's files live, derived from the package's own location, never the CWD."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parents[1]
CONF_DIR = PROJECT_ROOT / "conf"
DEFAULT_DATA_DIR = PROJECT_ROOT / "data" / "mnist"
DEFAULT_MLRUNS_DIR = PROJECT_ROOT / "mlruns"
DEFAULT_MODELS_DIR = PROJECT_ROOT / "models"
DEFAULT_TRAIN_CONFIG = CONF_DIR / "train_model.yaml"
DEFAULT_LOGGING_CONFIG = CONF_DIR / "logging.yaml"


def cache_dir() -> Path:
    """Derived files (ONNX exports): `DIGITFLOW_CACHE_DIR`, else `$XDG_CACHE_HOME/digitflow`."""
    explicit = os.environ.get("DIGITFLOW_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "digitflow"
