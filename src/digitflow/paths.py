"""Where the project's files live, derived from the package's own location, never the CWD.

The default configs ship inside the package (`digitflow/conf/`, also reachable as the checkout's
`conf/`). Working folders (prepared data, the embedded MLflow store, pulled models) live in the
source checkout when the package runs from one, else in `~/.local/share/digitflow`.
"""

from __future__ import annotations

from pathlib import Path


def _working_root(package_dir: Path) -> Path:
    checkout = package_dir.parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "src").is_dir():
        return checkout
    return Path.home() / ".local" / "share" / "digitflow"


PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR / "conf"
DEFAULT_TRAIN_CONFIG = CONF_DIR / "train_model.yaml"
DEFAULT_LOGGING_CONFIG = CONF_DIR / "logging.yaml"
PROJECT_ROOT = _working_root(PACKAGE_DIR)
DEFAULT_DATA_DIR = PROJECT_ROOT / "data" / "mnist"
DEFAULT_MLRUNS_DIR = PROJECT_ROOT / "mlruns"
DEFAULT_MODELS_DIR = PROJECT_ROOT / "models"
