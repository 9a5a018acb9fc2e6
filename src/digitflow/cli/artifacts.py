"""CLI commands for experiments, runs and artifacts: `experiments`, `runs`, `artifacts`, `pull`.

Each command reads MLflow's and AWS's usual environment variables once (`settings.CoreSettings`);
`--tracking-uri`, `--s3-endpoint-url` and `--timeout` override them. `pull` writes the two export
lines to stdout (so `eval "$(digitflow pull ...)"` works) and its progress and summary to stderr.
MLflow and boto3 are imported inside the commands, so `--help` stays quick.
"""

from __future__ import annotations

import shlex
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from digitflow import paths
from digitflow.artifacts.run_layout import CHECKPOINT_FILENAME, INT8_ONNX_FILENAME, ONNX_FILENAME
from digitflow.cli.common import DataDir, handle_errors
from digitflow.settings import (
    DEFAULT_EXPERIMENT,
    DEFAULT_PULL_WORKERS,
    DEFAULT_TIMEOUT,
    StoreConfig,
    read_core_settings,
)


class Shell(StrEnum):
    bash = "bash"
    powershell = "powershell"


TrackingUri = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking server (env MLFLOW_TRACKING_URI); unset: the embedded mlruns/.",
        show_default=False,
    ),
]
S3Endpoint = Annotated[
    str | None,
    typer.Option(
        "--s3-endpoint-url",
        help="S3-compatible endpoint for s3:// artifacts (env MLFLOW_S3_ENDPOINT_URL, "
        "else AWS_ENDPOINT_URL).",
        show_default=False,
    ),
]
MlrunsDir = Annotated[
    Path, typer.Option("--mlruns-dir", help="Embedded MLflow store (used without a tracking URI).")
]
Timeout = Annotated[
    float, typer.Option("--timeout", min=0.1, help="Seconds to wait for a server to answer.")
]


def store_config(
    tracking_uri: str | None, s3_endpoint_url: str | None, mlruns_dir: Path, timeout: float
) -> StoreConfig:
    """The environment's store settings with the command line's overrides applied."""
    return (
        read_core_settings()
        .store(mlruns_dir)
        .with_overrides(
            tracking_uri=tracking_uri or None,
            s3_endpoint_url=s3_endpoint_url or None,
            timeout=timeout,
        )
    )


def human_size(size: int) -> str:
    """`1234567` → `1.2 MiB`."""
    if size < 1024:
        return f"{size} B"
    value, unit = float(size) / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def export_lines(run_id: str, model_path: Path, shell: Shell) -> list[str]:
    """The two lines that point the REST API at a pulled model."""
    values = {"PRED_MODEL_UUID": run_id, "PRED_MODEL_PATH": str(model_path)}
    if shell is Shell.powershell:
        return [f"$Env:{k} = '{v.replace(chr(39), chr(39) * 2)}'" for k, v in values.items()]
    return [f"export {k}={shlex.quote(v)}" for k, v in values.items()]


@handle_errors
def experiments_command(
    tracking_uri: TrackingUri = None,
    mlruns_dir: MlrunsDir = paths.DEFAULT_MLRUNS_DIR,
    timeout: Timeout = DEFAULT_TIMEOUT,
) -> None:
    """List experiments and their artifact locations."""
    from digitflow.artifacts.tracking import list_experiments

    store = store_config(tracking_uri, None, mlruns_dir, timeout)
    found = list_experiments(store)
    width = max([len(e.name) for e in found] + [10])
    typer.echo(f"{'ID':>4}  {'EXPERIMENT':<{width}}  ARTIFACT LOCATION")
    for experiment in found:
        typer.echo(
            f"{experiment.experiment_id:>4}  {experiment.name:<{width}}  "
            f"{experiment.artifact_location}"
        )


@handle_errors
def runs_command(
    experiment: Annotated[
        str, typer.Option("--experiment", "-e", help="Experiment name.")
    ] = DEFAULT_EXPERIMENT,
    max_results: Annotated[int, typer.Option("--max", min=1, help="At most this many.")] = 50,
    tracking_uri: TrackingUri = None,
    mlruns_dir: MlrunsDir = paths.DEFAULT_MLRUNS_DIR,
    timeout: Timeout = DEFAULT_TIMEOUT,
) -> None:
    """List an experiment's runs, newest first, with their test metrics."""
    from digitflow.artifacts.tracking import list_runs

    store = store_config(tracking_uri, None, mlruns_dir, timeout)
    info, runs = list_runs(store, experiment, max_results)
    typer.echo(f"experiment {info.name} (id {info.experiment_id}): {info.artifact_location}")
    typer.echo(
        f"{'RUN UUID':<32}  {'NAME':<20}  {'STARTED (UTC)':<19}  {'STATUS':<9}  "
        f"{'TEST_ACC':>8}  {'TEST_LOSS':>9}"
    )
    for run in runs:
        started = run.start_time.strftime("%Y-%m-%d %H:%M:%S") if run.start_time else "-"
        accuracy = f"{run.test_accuracy:.4f}" if run.test_accuracy is not None else "-"
        loss = f"{run.test_loss:.4f}" if run.test_loss is not None else "-"
        typer.echo(
            f"{run.run_id:<32}  {run.run_name[:20]:<20}  {started:<19}  {run.status:<9}  "
            f"{accuracy:>8}  {loss:>9}"
        )


@handle_errors
def artifacts_command(
    run: Annotated[str, typer.Argument(help="Run UUID, runs:/<uuid>/... or models:/... URI.")],
    tracking_uri: TrackingUri = None,
    s3_endpoint_url: S3Endpoint = None,
    mlruns_dir: MlrunsDir = paths.DEFAULT_MLRUNS_DIR,
    timeout: Timeout = DEFAULT_TIMEOUT,
) -> None:
    """List a run's artifacts recursively with sizes (like `aws s3 ls --recursive`)."""
    from digitflow.artifacts.pull import list_run_artifacts
    from digitflow.artifacts.refs import resolve_run_id

    store = store_config(tracking_uri, s3_endpoint_url, mlruns_dir, timeout)
    run_id = resolve_run_id(run, store)
    listing = list_run_artifacts(run_id, store)
    for item in listing.files:
        modified = item.modified.strftime("%Y-%m-%d %H:%M:%S") if item.modified else " " * 19
        typer.echo(f"{modified}  {item.size:>12}  {listing.artifact_uri}/{item.path}")
    total = sum(f.size for f in listing.files)
    typer.echo(f"{len(listing.files)} files, {human_size(total)}", err=True)


@handle_errors
def pull_command(
    run: Annotated[str, typer.Argument(help="Run UUID, runs:/<uuid>/model or models:/... URI.")],
    dest: Annotated[
        Path, typer.Option("--dest", help="Models folder; the run lands in DEST/<run uuid>/.")
    ] = paths.DEFAULT_MODELS_DIR,
    shell: Annotated[
        Shell, typer.Option("--shell", help="Syntax of the printed export lines.")
    ] = Shell.bash,
    workers: Annotated[
        int, typer.Option("--workers", min=1, max=32, help="Parallel downloads.")
    ] = DEFAULT_PULL_WORKERS,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")
    ] = True,
    tracking_uri: TrackingUri = None,
    s3_endpoint_url: S3Endpoint = None,
    mlruns_dir: MlrunsDir = paths.DEFAULT_MLRUNS_DIR,
    timeout: Timeout = DEFAULT_TIMEOUT,
) -> None:
    """Download a run's artifacts into DEST/<run uuid>/artifacts/ and print the exports."""
    from digitflow.artifacts.pull import pull_run_artifacts
    from digitflow.artifacts.refs import resolve_run_id
    from digitflow.artifacts.tracking import Tracking

    store = store_config(tracking_uri, s3_endpoint_url, mlruns_dir, timeout)
    tracking = Tracking(store)
    run_id = resolve_run_id(run, store, tracking)
    result = pull_run_artifacts(
        run_id, dest, store, workers=workers, progress=progress, tracking=tracking
    )
    if result.downloaded_files:
        typer.echo(
            f"pulled {result.downloaded_files} of {result.files} files "
            f"({human_size(result.downloaded_bytes)}) into {result.run_dir} "
            f"in {result.seconds:.1f} s",
            err=True,
        )
    else:
        typer.echo(
            f"{result.run_dir} is complete and verified ({result.files} files); nothing downloaded",
            err=True,
        )
    # absolute, not resolved: the run's link stays valid across re-pulls, a version folder not
    for line in export_lines(run_id, result.model_path.absolute(), shell):
        typer.echo(line)


@handle_errors
def export_command(
    target: Annotated[
        str,
        typer.Argument(
            help="A checkpoint (or its folder), or a run: UUID, runs:/<uuid>/model, models:/..."
        ),
    ],
    tracking_uri: TrackingUri = None,
    s3_endpoint_url: S3Endpoint = None,
    mlruns_dir: MlrunsDir = paths.DEFAULT_MLRUNS_DIR,
    timeout: Timeout = DEFAULT_TIMEOUT,
    data_dir: DataDir = paths.DEFAULT_DATA_DIR,
) -> None:
    """Add the checked ONNX graph and an MLmodel beside a checkpoint (needs torch).

    A local path gains model.onnx and MLmodel in its folder; a run gets them logged to its
    model/ artifacts, so the slim image serves it and `mlflow models serve` loads it. When
    --data-dir holds the prepared PNGs, the int8 graph is calibrated on training images and
    kept as model.int8.onnx if it answers like the float graph on the held-out ones.
    """
    from digitflow.training.mlflow_model import (
        Export,
        export_checkpoint,
        export_run,
        int8_verdict,
    )

    def int8_line(export: Export) -> str:
        check = export.int8_check
        if check is None:
            return f"no {INT8_ONNX_FILENAME}: no prepared data in {data_dir}"
        failures = check.failures()
        reasons = f": {'; '.join(failures)}" if failures else ""
        return (
            f"{INT8_ONNX_FILENAME} {int8_verdict(check)}{reasons} (same class as float on "
            f"{check.agreement:.2%} of "
            f"{check.images} held-out images, accuracy {check.int8_accuracy:.2%} vs "
            f"{check.float_accuracy:.2%})"
        )

    local = Path(target)
    if local.exists():
        checkpoint = local / CHECKPOINT_FILENAME if local.is_dir() else local
        export = export_checkpoint(checkpoint, data_dir)
        typer.echo(
            f"wrote {checkpoint.parent / ONNX_FILENAME} (sha256 {export.record.onnx_sha256})"
        )
        typer.echo(int8_line(export))
        return
    from digitflow.artifacts.refs import resolve_run_id
    from digitflow.artifacts.tracking import Tracking, TrackingTarget

    store = store_config(tracking_uri, s3_endpoint_url, mlruns_dir, timeout)
    tracking = Tracking(store)
    run_id = resolve_run_id(target, store, tracking)
    export = export_run(run_id, store, TrackingTarget(tracking.uri), data_dir)
    typer.echo(f"logged model/{ONNX_FILENAME} to run {run_id} (sha256 {export.record.onnx_sha256})")
    typer.echo(int8_line(export))


def register(app: typer.Typer) -> None:
    """Add the artifact commands to `app`."""
    app.command("experiments")(experiments_command)
    app.command("runs")(runs_command)
    app.command("artifacts")(artifacts_command)
    app.command("pull")(pull_command)
    app.command("export")(export_command)
