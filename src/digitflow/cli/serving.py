"""CLI commands for serving (`digitflow serve`) and batch prediction (`digitflow predict`)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from digitflow import paths
from digitflow.cli.common import handle_errors
from digitflow.logging_setup import configure_cli_logging
from digitflow.settings import CoreSettings, read_core_settings

if TYPE_CHECKING:  # imported inside the commands: `--help` stays free of torch and MLflow
    from digitflow.artifacts.refs import ModelPin, ServedModel
    from digitflow.inference.selftest import SelfTestReport

logger = logging.getLogger(__name__)


GUNICORN_CONFIG = "python:digitflow_fastapi.lifecycle.gunicorn_conf"
APP_IMPORT_STRING = "digitflow_fastapi.main:APP"
RAY_MODULE = "digitflow_fastapi.scale.ray_serve"
Engine = Literal["gunicorn", "ray"]


def default_workers() -> int:
    """Worker processes for this machine: one per core, at least one."""
    return max(1, os.cpu_count() or 1)


def gunicorn_argv(host: str, port: int, workers: int) -> list[str]:
    """The gunicorn command `digitflow serve` runs: the package's config, uvicorn workers.

    Run as `python -P -m gunicorn` with this interpreter, so no script needs to be on PATH and
    the working folder is not searched first for the modules gunicorn imports at start.
    """
    return [
        sys.executable,
        "-P",
        "-m",
        "gunicorn",
        APP_IMPORT_STRING,
        "-c",
        GUNICORN_CONFIG,
        "-b",
        f"{host}:{port}",
        "-w",
        str(workers),
        "-k",
        "uvicorn_worker.UvicornWorker",
    ]


def choose_served_model(
    settings: CoreSettings, data_dir: Path, mlruns_dir: Path
) -> tuple[ModelPin, ServedModel, SelfTestReport]:
    """Decide the model to serve (the default one, trained on first use, if none is configured),
    then load and self-test it here once, so a bad checkpoint or a golden mismatch fails loudly,
    non-zero, before serving. The server this command becomes reads the decision (the pin)."""
    from digitflow.artifacts.refs import pin_served_model, served_model_of
    from digitflow.inference.selftest import load_checked_classifier

    model_path, model_uuid = settings.PRED_MODEL_PATH, settings.PRED_MODEL_UUID or None
    if not settings.model_configured:
        # Only here: training needs torch, which a slim install serving a given model lacks.
        from digitflow.training.default_model import ensure_default_model

        default = ensure_default_model(paths.DEFAULT_TRAIN_CONFIG, data_dir, mlruns_dir)
        model_path, model_uuid = default.model_path, model_uuid or default.run_id
    store = settings.store(mlruns_dir)
    pin = pin_served_model(model_path, settings.PRED_MODEL_URI, model_uuid, store)
    served = served_model_of(pin, settings.PRED_MODELS_DIR, store)
    _, report = load_checked_classifier(
        served.model_path,
        backend=settings.INFERENCE_BACKEND,
        use_cuda=settings.USE_CUDA,
        use_mps=settings.USE_MPS,
        cache_dir=settings.cache_dir(),
    )
    return pin, served, report


@handle_errors
def serve_command(
    host: Annotated[str, typer.Option("--host")] = "0.0.0.0",
    port: Annotated[
        int | None, typer.Option("--port", min=1, max=65535, help="Default: PORT, else 8080.")
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers", min=0, help="Worker processes (0: WEB_CONCURRENCY, else one per core)"
        ),
    ] = 0,
    data_dir: Annotated[Path, typer.Option("--data-dir")] = paths.DEFAULT_DATA_DIR,
    mlruns_dir: Annotated[Path, typer.Option("--mlruns-dir")] = paths.DEFAULT_MLRUNS_DIR,
    engine: Annotated[
        Engine, typer.Option("--engine", help="gunicorn (this machine) or ray (Ray Serve)")
    ] = "gunicorn",
    replicas: Annotated[
        int, typer.Option("--replicas", min=1, help="Ray Serve replicas (--engine ray)")
    ] = 1,
) -> None:
    """Serve the REST API with gunicorn + uvicorn workers (the default model if none is set)."""
    from digitflow.artifacts.refs import PIN_VARIABLE

    configure_cli_logging()
    settings = read_core_settings()
    pin, served, report = choose_served_model(settings, data_dir, mlruns_dir)
    n_workers = workers or settings.WEB_CONCURRENCY or default_workers()
    port = port or settings.PORT
    os.environ[PIN_VARIABLE] = pin.to_json()  # the decision, for the server this process becomes
    if not settings.model_configured:  # the default model is served as if PRED_MODEL_PATH named it
        os.environ.update(PRED_MODEL_PATH=str(served.model_path), PRED_MODEL_UUID=served.model_uuid)
    argv = gunicorn_argv(host, port, n_workers)
    scale = f"{n_workers} workers"
    if engine == "ray":  # by module name: the core never imports the web layer
        argv = [sys.executable, "-m", RAY_MODULE, "--host", host, "--port", str(port)]
        argv, scale = [*argv, "--replicas", str(replicas)], f"{replicas} Ray Serve replicas"
    typer.echo(
        f"serving model {served.model_uuid or '(no uuid)'} on http://{host}:{port} with "
        f"{scale} ({report.golden_checked} golden images reproduced)"
    )
    sys.stdout.flush()
    os.execv(argv[0], argv)


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
        str | None,
        typer.Option(
            "--backend",
            help="Inference engine: onnx, onnx-int8 or torch (default: INFERENCE_BACKEND)",
        ),
    ] = None,
    data_dir: Annotated[Path, typer.Option("--data-dir")] = paths.DEFAULT_DATA_DIR,
    mlruns_dir: Annotated[Path, typer.Option("--mlruns-dir")] = paths.DEFAULT_MLRUNS_DIR,
) -> None:
    """Predict the digit of every image: one JSON line (time, image_filepath, prediction) each."""
    configure_cli_logging()
    from digitflow.inference.batch_predict import predict_files
    from digitflow.inference.classifier import Classifier

    settings = read_core_settings()
    model_path = model_path or settings.PRED_MODEL_PATH
    if model_path is None:
        from digitflow.training.default_model import ensure_default_model

        model_path = ensure_default_model(
            paths.DEFAULT_TRAIN_CONFIG, data_dir, mlruns_dir
        ).model_path
    classifier = Classifier.from_checkpoint(
        model_path, backend=backend or settings.INFERENCE_BACKEND, cache_dir=settings.cache_dir()
    )
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
