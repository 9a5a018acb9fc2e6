"""CLI commands for serving and batch prediction (filled in by the inference-service issue)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from digitflow import paths
from digitflow.cli_common import handle_errors
from digitflow.default_model import ensure_default_model
from digitflow.logging_setup import configure_cli_logging


@handle_errors
def serve_command(
    data_dir: Annotated[Path, typer.Option("--data-dir")] = paths.DEFAULT_DATA_DIR,
    mlruns_dir: Annotated[Path, typer.Option("--mlruns-dir")] = paths.DEFAULT_MLRUNS_DIR,
) -> None:
    """Serve the model (for now: make sure the default model exists, then stop)."""
    configure_cli_logging()
    model = ensure_default_model(paths.DEFAULT_TRAIN_CONFIG, data_dir, mlruns_dir)
    typer.echo(f"default model: run {model.run_id} at {model.model_path}")
    typer.echo("the REST API is not built yet (inference-service issue); stopping here")


def register(app: typer.Typer) -> None:
    """Add the serving commands to `app`."""
    app.command("serve")(serve_command)
