"""CLI commands for serving (`digitflow serve`) and batch prediction (`digitflow predict`)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from digitflow import paths
from digitflow.cli_common import handle_errors
from digitflow.default_model import ensure_default_model
from digitflow.logging_setup import configure_cli_logging

logger = logging.getLogger(__name__)


def default_workers() -> int:
    """Worker processes for this machine: one per core, at least one."""
    return max(1, os.cpu_count() or 1)


@handle_errors
def serve_command(
    host: Annotated[str, typer.Option("--host")] = "0.0.0.0",
    port: Annotated[int, typer.Option("--port")] = 8080,
    workers: Annotated[
        int, typer.Option("--workers", min=0, help="Worker processes (0: one per core)")
    ] = 0,
    data_dir: Annotated[Path, typer.Option("--data-dir")] = paths.DEFAULT_DATA_DIR,
    mlruns_dir: Annotated[Path, typer.Option("--mlruns-dir")] = paths.DEFAULT_MLRUNS_DIR,
) -> None:
    """Serve the REST API with gunicorn + uvicorn workers (the default model if none is set)."""
    configure_cli_logging()
    from digitflow_fastapi.app import load_classifier
    from digitflow_fastapi.config import Settings

    env = dict(os.environ)
    if not env.get("PRED_MODEL_PATH") and not env.get("PRED_MODEL_URI"):
        model = ensure_default_model(paths.DEFAULT_TRAIN_CONFIG, data_dir, mlruns_dir)
        env["PRED_MODEL_PATH"] = str(model.model_path)
        env.setdefault("PRED_MODEL_UUID", model.run_id)
    settings = Settings(**{k: v for k, v in env.items() if k in Settings.model_fields})  # type: ignore[arg-type]
    # Load and self-test once here so a bad checkpoint or golden mismatch fails loudly, non-zero.
    _, model_uuid, report = load_classifier(settings)
    if settings.PRED_MODEL_URI and not settings.PRED_MODEL_PATH:
        env["PRED_MODEL_UUID"] = env.get("PRED_MODEL_UUID") or model_uuid
    n_workers = workers or default_workers()
    env["WEB_CONCURRENCY"] = str(n_workers)
    typer.echo(
        f"serving model {model_uuid or '(no uuid)'} on http://{host}:{port} with {n_workers} "
        f"workers ({report['golden_checked']} golden images reproduced)"
    )
    gunicorn = Path(sys.executable).parent / "gunicorn"
    argv = [
        str(gunicorn),
        "digitflow_fastapi.main:APP",
        "-c",
        str(paths.PACKAGE_DIR.parent / "gunicorn.conf.py"),
        "-b",
        f"{host}:{port}",
        "-w",
        str(n_workers),
        "-k",
        "uvicorn_worker.UvicornWorker",
    ]
    sys.stdout.flush()
    os.execve(argv[0], argv, env)


@handle_errors
def predict_command(
    inputs: Annotated[list[Path], typer.Argument(help="Image files or folders")],
    model_path: Annotated[
        Path | None, typer.Option("--model-path", help="Checkpoint (default: PRED_MODEL_PATH)")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="JSON Lines file (default: stdout)")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    backend: Annotated[
        str,
        typer.Option(
            "--backend", envvar="INFERENCE_BACKEND", help="Inference engine: onnx or torch"
        ),
    ] = "onnx",
    data_dir: Annotated[Path, typer.Option("--data-dir")] = paths.DEFAULT_DATA_DIR,
    mlruns_dir: Annotated[Path, typer.Option("--mlruns-dir")] = paths.DEFAULT_MLRUNS_DIR,
) -> None:
    """Predict the digit of every image: one JSON line (time, image_filepath, prediction) each."""
    configure_cli_logging()
    from digitflow.batch_predict import predict_files
    from digitflow.inference import Classifier

    if model_path is None:
        env_path = os.environ.get("PRED_MODEL_PATH")
        if env_path:
            model_path = Path(env_path)
        else:
            model_path = ensure_default_model(
                paths.DEFAULT_TRAIN_CONFIG, data_dir, mlruns_dir
            ).model_path
    classifier = Classifier.from_checkpoint(model_path, backend=backend)
    if output is None:
        failures = predict_files(classifier, inputs, sys.stdout, progress=progress)
    else:
        with output.open("w", encoding="utf-8") as out:
            failures = predict_files(classifier, inputs, out, progress=progress)
    if failures:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the serving commands to `app`."""
    app.command("serve")(serve_command)
    app.command("predict")(predict_command)
