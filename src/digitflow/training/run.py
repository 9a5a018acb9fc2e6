"""A whole training run: data → CNN → per-epoch metrics → checkpoint + golden set, in MLflow."""

from __future__ import annotations

import hashlib
import logging
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch

from digitflow.artifacts.run_layout import (
    CHECKPOINT_FILENAME,
    CONFIG_ARTIFACT,
    GOLDEN_FILENAME,
    MODEL_DIR,
    interval_checkpoint_dir,
)
from digitflow.artifacts.tracking import TrackingTarget, ensure_experiment
from digitflow.data.mnist import DigitSet, load_split
from digitflow.data.photo_training import render_photo_set
from digitflow.device import device_from_name
from digitflow.training.checkpoint import save_checkpoint
from digitflow.training.config import TrainConfig
from digitflow.training.golden import GoldenImage, write_golden
from digitflow.training.loop import (
    Augmentation,
    EpochMetrics,
    evaluate,
    predict_labels,
    train_one_epoch,
)
from digitflow.training.mlflow_model import (
    INT8_TAG,
    ONNX_DIGEST_TAG,
    int8_metrics,
    int8_verdict,
    write_mlflow_model,
)
from digitflow.training.net import Net
from digitflow.training.quantize import CheckImages, split_check_images

logger = logging.getLogger(__name__)

CONFIG_DIGEST_TAG = "digitflow.config_digest"


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced."""

    run_id: str
    artifact_uri: str
    test_accuracy: float
    test_loss: float
    seconds: float


def config_digest(config: TrainConfig) -> str:
    """A short stable hash of the resolved config, tagged on the run to find it again."""
    return hashlib.sha256(config.to_json().encode()).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch's global generators (weight init, dropout)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def golden_set(
    model: Net, data_dir: Path, test: DigitSet, count: int, device: torch.device
) -> list[GoldenImage]:
    """`count` held-out images (PNG bytes), spread over the classes, with the predictions
    this model makes for them, so a server can prove it reproduces the run."""
    per_class: dict[int, list[int]] = {}
    for i, label in enumerate(test.labels.tolist()):
        per_class.setdefault(int(label), []).append(i)
    chosen: list[int] = []
    rank = 0
    while len(chosen) < min(count, len(test)):
        for members in per_class.values():
            if rank < len(members) and len(chosen) < count:
                chosen.append(members[rank])
        rank += 1
    predictions = predict_labels(model, test.images[chosen], device).tolist()
    return [
        GoldenImage(
            filepath=test.filepaths[i],
            label=int(test.labels[i]),
            prediction=str(prediction),
            png=(data_dir / test.filepaths[i]).read_bytes(),
        )
        for i, prediction in zip(chosen, predictions, strict=True)
    ]


@dataclass(frozen=True)
class _Fitted:
    """The last epoch's metrics."""

    train: EpochMetrics
    test: EpochMetrics


def _log_epoch(epoch: int, config: TrainConfig, fitted: _Fitted, progress: bool) -> None:
    mlflow.log_metrics(
        {
            "train_loss": fitted.train.loss,
            "train_accuracy": fitted.train.accuracy,
            "test_loss": fitted.test.loss,
            "test_accuracy": fitted.test.accuracy,
        },
        step=epoch,
    )
    if progress:
        logger.info(
            "epoch %d/%d: train_loss %.4f, test_loss %.4f, test_accuracy %.4f",
            epoch,
            config.epochs,
            fitted.train.loss,
            fitted.test.loss,
            fitted.test.accuracy,
        )


def _fit(
    model: Net,
    config: TrainConfig,
    train: DigitSet,
    test: DigitSet,
    device: torch.device,
    workdir: Path,
    progress: bool,
) -> tuple[_Fitted, torch.optim.Optimizer]:
    """Every epoch: train, evaluate, log metrics (and interval checkpoints) to the active run."""
    generator = torch.Generator().manual_seed(config.seed)  # shuffling and augmentation
    optimiser = torch.optim.Adadelta(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimiser, step_size=1, gamma=config.gamma)
    augmentation = Augmentation() if config.augment else None
    photos = (
        render_photo_set(train.images, config.photos, config.photo_rate, config.seed)
        if config.photos and config.photo_rate > 0
        else None
    )
    fitted: _Fitted | None = None
    for epoch in range(1, config.epochs + 1):
        description = f"epoch {epoch}/{config.epochs}"
        fitted = _Fitted(
            train=train_one_epoch(
                model,
                train,
                optimiser,
                device,
                config.train_bs,
                generator,
                augmentation,
                progress=progress,
                description=description,
                photos=photos,
            ),
            test=evaluate(model, test, device, config.test_bs),
        )
        scheduler.step()
        _log_epoch(epoch, config, fitted, progress)
        interval = config.model_checkpoint_interval
        if interval and epoch % interval == 0 and epoch != config.epochs:
            folder = interval_checkpoint_dir(epoch)
            path = workdir / folder / CHECKPOINT_FILENAME
            save_checkpoint(path, model, optimiser, epoch, fitted.train.loss, fitted.test.loss)
            mlflow.log_artifact(str(path), folder)
    assert fitted is not None  # epochs >= 1 (validated)
    return fitted, optimiser


def _log_model(
    model: Net,
    optimiser: torch.optim.Optimizer,
    fitted: _Fitted,
    config: TrainConfig,
    golden: list[GoldenImage],
    check_data: CheckImages,
    workdir: Path,
) -> None:
    """Log the `model/` folder (the seed's `model.pt`, `golden.json`, `model.onnx` with its
    `MLmodel`: an MLflow Model, and `model.int8.onnx` when it passed its check) and
    `train_model_config.json` to the run; tag the graph's digest and log the int8 check."""
    model_dir = workdir / MODEL_DIR
    checkpoint = model_dir / CHECKPOINT_FILENAME
    save_checkpoint(
        checkpoint, model, optimiser, config.epochs, fitted.train.loss, fitted.test.loss
    )
    write_golden(model_dir / GOLDEN_FILENAME, golden)
    export = write_mlflow_model(checkpoint, model, golden, check_data)
    mlflow.log_artifacts(str(model_dir), MODEL_DIR)
    mlflow.set_tag(ONNX_DIGEST_TAG, export.record.onnx_sha256)
    if export.int8_check is not None:
        mlflow.log_metrics(int8_metrics(export.int8_check))
        mlflow.set_tag(INT8_TAG, int8_verdict(export.int8_check))
    mlflow.log_dict(config.to_dict(), CONFIG_ARTIFACT)


def run_training(
    config: TrainConfig, data_dir: Path, target: TrackingTarget, progress: bool = True
) -> TrainResult:
    """Train `Net` as `config` says on the PNGs in `data_dir` and log it all to `target`."""
    started = time.perf_counter()
    device = device_from_name(config.device)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    seed_everything(config.seed)
    train = load_split(data_dir, "train", progress=progress)
    test = load_split(data_dir, "test", progress=progress)
    if config.train_limit:
        train = train.subset(config.train_limit)
    model = Net().to(device)

    mlflow.set_tracking_uri(target.uri)
    experiment_id = ensure_experiment(target, config.mlflow_exp_name)
    tags = {CONFIG_DIGEST_TAG: config_digest(config), "digitflow.device": str(device)}
    with (
        mlflow.start_run(
            experiment_id=experiment_id, run_name=config.mlflow_run_name, tags=tags
        ) as run,
        tempfile.TemporaryDirectory(prefix="digitflow-train-") as tmp,
    ):
        mlflow.log_params(config.to_dict())
        mlflow.log_params({"train_size": len(train), "test_size": len(test)})
        fitted, optimiser = _fit(model, config, train, test, device, Path(tmp), progress)
        golden = golden_set(model, data_dir, test, config.golden_count, device)
        check_data = split_check_images(train, test)
        _log_model(model, optimiser, fitted, config, golden, check_data, Path(tmp))
        return TrainResult(
            run_id=run.info.run_id,
            artifact_uri=str(run.info.artifact_uri),
            test_accuracy=fitted.test.accuracy,
            test_loss=fitted.test.loss,
            seconds=time.perf_counter() - started,
        )


def find_latest_run(target: TrackingTarget, experiment_name: str, digest: str) -> str | None:
    """The newest FINISHED run of `experiment_name` trained with the config of `digest`."""
    client = target.client()
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{CONFIG_DIGEST_TAG}` = '{digest}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return str(runs[0].info.run_id) if runs else None
