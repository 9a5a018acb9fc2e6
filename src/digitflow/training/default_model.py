"""The model `make serve` serves when nothing is configured: the latest run of the default config
in the embedded store, trained (data prepared first) on first use."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from digitflow.artifacts.run_layout import MODEL_ARTIFACT
from digitflow.artifacts.tracking import embedded_target
from digitflow.data.mnist import prepare_data
from digitflow.errors import ArtifactNotFound
from digitflow.training.config import load_train_config
from digitflow.training.run import config_digest, find_latest_run, run_training

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DefaultModel:
    """A run of the default config and the local path of its checkpoint."""

    run_id: str
    model_path: Path
    trained_now: bool


def ensure_default_model(
    config_path: Path, data_dir: Path, mlruns_dir: Path, progress: bool = True
) -> DefaultModel:
    """Find (or prepare data for and train) the default model in the embedded store."""
    config = load_train_config(config_path)
    target = embedded_target(mlruns_dir)
    run_id = find_latest_run(target, config.mlflow_exp_name, config_digest(config))
    trained_now = False
    if run_id is None:
        logger.info("no run of the default config yet: preparing data and training it")
        if not (data_dir / "train.csv").is_file():
            prepare_data(data_dir, progress=progress)
        run_id = run_training(config, data_dir, target, progress=progress).run_id
        trained_now = True
    uri = target.client().get_run(run_id).info.artifact_uri
    path = Path(unquote(urlparse(str(uri)).path)) / MODEL_ARTIFACT
    if not path.is_file():
        raise ArtifactNotFound(f"run {run_id} has no {MODEL_ARTIFACT} at {path}")
    return DefaultModel(run_id=run_id, model_path=path, trained_now=trained_now)
