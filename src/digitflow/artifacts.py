"""Experiments, runs and their artifacts; pulling a run's model into the local cache.

A pull lands in `<models_dir>/<run uuid>/artifacts/...` (the seed's layout). It is written into a
hidden temporary folder beside it and renamed into place, so a crash or Ctrl-C never leaves a
half-written `model.pt` where a server would load it. A manifest of sizes and SHA-256 digests
(`<run uuid>/.digitflow-manifest.json`) lets a second pull, and `resolve_model`, check the copy
without downloading it again. Artifacts are read through the MLflow server's artifact proxy
(`mlflow-artifacts:`), straight from S3-compatible storage (`s3://`), or from a local folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.store.model_registry.rest_store import RestStore as RegistryRestStore
from mlflow.store.tracking.rest_store import RestStore
from mlflow.tracking import MlflowClient
from mlflow.utils.rest_utils import MlflowHostCreds
from tqdm import tqdm

from digitflow import paths
from digitflow.artifact_sources import (
    ArtifactSource,
    LocalSource,
    ProxySource,
    RemoteFile,
    S3Source,
    TransientError,
    copy_file,
)
from digitflow.errors import (
    ArtifactIntegrityError,
    ArtifactNotFound,
    DestinationNotWritable,
    ExperimentNotFound,
    ModelNotFound,
    RegisteredModelNotFound,
    RunNotFound,
    TrackingAuthError,
    TrackingUnavailable,
    UnsupportedArtifactLocation,
)
from digitflow.tracking import DEFAULT_EXPERIMENT, embedded_target, probe_server
from digitflow.trainer import CONFIG_ARTIFACT, MODEL_ARTIFACT

logger = logging.getLogger(__name__)

MANIFEST_NAME = ".digitflow-manifest.json"
RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
RUNS_URI_PATTERN = re.compile(r"^runs:/([0-9a-f]{32})(/.*)?$")
MODELS_URI_PATTERN = re.compile(r"^models:/([^/@]+)(?:/([^/@]+)|@([^/@]+))/?$")
DEFAULT_TIMEOUT = 10.0
DEFAULT_WORKERS = 4
RETRY_ATTEMPTS = 3
RETRY_BACKOFF = 0.5


@dataclass(frozen=True)
class StoreConfig:
    """Where experiments, runs and artifacts live, and the credentials to read them."""

    tracking_uri: str | None = None
    username: str | None = None
    password: str | None = None
    s3_endpoint_url: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    mlruns_dir: Path = paths.DEFAULT_MLRUNS_DIR
    timeout: float = DEFAULT_TIMEOUT
    s3_region: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> StoreConfig:
        """Read MLflow's and AWS's usual variables (empty values count as unset)."""

        def get(*names: str) -> str | None:
            return next((environ[n] for n in names if environ.get(n)), None)

        return cls(
            tracking_uri=get("MLFLOW_TRACKING_URI"),
            username=get("MLFLOW_TRACKING_USERNAME"),
            password=get("MLFLOW_TRACKING_PASSWORD"),
            s3_endpoint_url=get("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"),
            aws_access_key_id=get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=get("AWS_SECRET_ACCESS_KEY"),
            s3_region=get("AWS_REGION", "AWS_DEFAULT_REGION"),
        )

    @property
    def remote(self) -> bool:
        """True when the tracking URI is an HTTP(S) server."""
        return bool(self.tracking_uri and self.tracking_uri.startswith(("http://", "https://")))


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference made local: the run it came from (if known) and its checkpoint."""

    run_id: str | None
    model_path: Path


@dataclass(frozen=True)
class ExperimentInfo:
    """An experiment and where its runs' artifacts are stored."""

    experiment_id: str
    name: str
    artifact_location: str


@dataclass(frozen=True)
class RunSummary:
    """One run, as `digitflow runs` lists it."""

    run_id: str
    run_name: str
    start_time: datetime | None
    status: str
    test_accuracy: float | None
    test_loss: float | None


@dataclass(frozen=True)
class RunArtifacts:
    """A run's artifact root and every file below it."""

    run_id: str
    artifact_uri: str
    files: list[RemoteFile]


@dataclass(frozen=True)
class PullResult:
    """What a pull did: where the run landed and how much it downloaded."""

    run_id: str
    run_dir: Path
    model_path: Path
    files: int
    downloaded_files: int
    downloaded_bytes: int
    seconds: float

    @property
    def config_path(self) -> Path:
        return self.run_dir / "artifacts" / CONFIG_ARTIFACT


class Tracking:
    """Read access to experiments, runs and the model registry, with explicit credentials.

    A remote server is probed first (short timeout, 401/403 → `TrackingAuthError`); MLflow's REST
    stores are then given the credentials directly instead of through environment variables.
    """

    def __init__(self, store: StoreConfig) -> None:
        self.store = store
        self.runs: Any
        self.registry: Any
        if store.remote:
            uri = str(store.tracking_uri).rstrip("/")
            probe_server(uri, store.username, store.password, store.timeout)
            creds = MlflowHostCreds(  # type: ignore[no-untyped-call]
                host=uri, username=store.username, password=store.password
            )
            self.runs = RestStore(lambda: creds)  # type: ignore[no-untyped-call]
            self.registry = RegistryRestStore(lambda: creds)  # type: ignore[no-untyped-call]
            self.uri = uri
        else:
            self.uri = store.tracking_uri or embedded_target(store.mlruns_dir).uri
            client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            self.runs = self.registry = client

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except MlflowException as exc:
            code = exc.error_code
            if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
                raise TrackingAuthError(
                    f"MLflow server refused access to {what} ({code})"
                ) from None
            if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                raise LookupError(what) from None
            raise TrackingUnavailable(f"MLflow failed for {what}: {exc.message}") from None

    def experiments(self) -> list[ExperimentInfo]:
        with self._errors("experiments"):
            found = self.runs.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000)
        return [
            ExperimentInfo(str(e.experiment_id), str(e.name), str(e.artifact_location))
            for e in found
        ]

    def experiment(self, name: str) -> ExperimentInfo:
        try:
            with self._errors(f"experiment {name!r}"):
                found = self.runs.get_experiment_by_name(name)
        except LookupError:
            found = None
        if found is None:
            raise ExperimentNotFound(f"no experiment named {name!r} at {self.uri}")
        return ExperimentInfo(str(found.experiment_id), str(found.name), found.artifact_location)

    def run_artifact_uri(self, run_id: str) -> str:
        """The run's artifact root (`<experiment location>/<run uuid>/artifacts`)."""
        if not RUN_ID_PATTERN.match(run_id):
            raise RunNotFound(f"{run_id!r} is not a run UUID (32 hex digits)")
        try:
            with self._errors(f"run {run_id}"):
                run = self.runs.get_run(run_id)
        except LookupError:
            raise RunNotFound(f"no run with UUID {run_id} at {self.uri}") from None
        return str(run.info.artifact_uri)

    def recent_runs(self, experiment: ExperimentInfo, max_results: int) -> list[RunSummary]:
        with self._errors(f"runs of {experiment.name!r}"):
            found = self.runs.search_runs(
                experiment_ids=[experiment.experiment_id],
                filter_string="",
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=max_results,
                order_by=["attributes.start_time DESC"],
            )
        summaries = []
        for run in found:
            started = run.info.start_time
            metrics = run.data.metrics
            summaries.append(
                RunSummary(
                    run_id=str(run.info.run_id),
                    run_name=str(run.info.run_name or ""),
                    start_time=datetime.fromtimestamp(started / 1000, UTC) if started else None,
                    status=str(run.info.status),
                    test_accuracy=metrics.get("test_accuracy"),
                    test_loss=metrics.get("test_loss"),
                )
            )
        return summaries

    def registered_run_id(self, name: str, version: str | None, alias: str | None) -> str:
        """The run behind `models:/<name>/<version>` or `models:/<name>@<alias>`."""
        label = f"models:/{name}/{version}" if version else f"models:/{name}@{alias}"
        try:
            with self._errors(label):
                if version:
                    found = self.registry.get_model_version(name, version)
                else:
                    found = self.registry.get_model_version_by_alias(name, alias)
        except LookupError:
            raise RegisteredModelNotFound(f"no registered model version {label}") from None
        run_id = found.run_id
        if not run_id:
            match = RUNS_URI_PATTERN.match(str(found.source or ""))
            run_id = match.group(1) if match else None
        if not run_id:
            raise ArtifactNotFound(f"{label} is not linked to a run ({found.source})")
        return str(run_id)


def artifact_source(artifact_uri: str, store: StoreConfig, workers: int) -> ArtifactSource:
    """The reader for a run's artifact root, by its scheme."""
    scheme = urllib.parse.urlparse(artifact_uri).scheme
    if scheme in ("s3", "s3a"):
        return S3Source(
            artifact_uri,
            store.s3_endpoint_url,
            store.aws_access_key_id,
            store.aws_secret_access_key,
            store.timeout,
            max_pool=workers,
            region=store.s3_region,
        )
    if scheme == "mlflow-artifacts":
        if not store.remote:
            raise UnsupportedArtifactLocation(
                f"{artifact_uri} is served by an MLflow server; set MLFLOW_TRACKING_URI to it"
            )
        return ProxySource(
            artifact_uri,
            str(store.tracking_uri),
            store.username,
            store.password,
            store.timeout,
            max_pool=workers,
        )
    if scheme == "file":
        return LocalSource(Path(urllib.parse.unquote(urllib.parse.urlparse(artifact_uri).path)))
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        return LocalSource(Path(artifact_uri))
    raise UnsupportedArtifactLocation(
        f"artifact location {artifact_uri} is not supported (s3://, mlflow-artifacts:, file://)"
    )


def list_experiments(store: StoreConfig) -> list[ExperimentInfo]:
    """Every active experiment with its artifact location."""
    return Tracking(store).experiments()


def list_runs(
    store: StoreConfig, experiment_name: str = DEFAULT_EXPERIMENT, max_results: int = 50
) -> tuple[ExperimentInfo, list[RunSummary]]:
    """The experiment and its runs, newest first."""
    tracking = Tracking(store)
    experiment = tracking.experiment(experiment_name)
    return experiment, tracking.recent_runs(experiment, max_results)


def list_run_artifacts(run_id: str, store: StoreConfig) -> RunArtifacts:
    """Every file under the run's artifact root, recursively, with sizes."""
    artifact_uri = Tracking(store).run_artifact_uri(run_id)
    files = artifact_source(artifact_uri, store, DEFAULT_WORKERS).list_files()
    return RunArtifacts(run_id, artifact_uri, sorted(files, key=lambda f: f.path))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(run_dir: Path) -> dict[str, dict[str, Any]]:
    """`path → {size, sha256, md5}` of a completed pull; empty if there is none."""
    try:
        data = json.loads((run_dir / MANIFEST_NAME).read_text())
        return {str(entry["path"]): entry for entry in data["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def verify_pulled_run(run_dir: Path) -> bool:
    """True if a completed pull is intact: every manifest file present with its size and digest."""
    manifest = read_manifest(run_dir)
    if not manifest:
        return False
    for path, entry in manifest.items():
        local = run_dir / "artifacts" / path
        try:
            if local.stat().st_size != entry["size"] or file_sha256(local) != entry["sha256"]:
                return False
        except OSError:
            return False
    return True


def _local_copy_matches(run_dir: Path, remote: RemoteFile, manifest: Mapping[str, Any]) -> bool:
    """Whether the already pulled file equals `remote` (size, then MD5 or the recorded SHA-256)."""
    local = run_dir / "artifacts" / remote.path
    entry = manifest.get(remote.path)
    try:
        if entry is None or local.stat().st_size != remote.size:
            return False
        if remote.md5 and _file_md5(local) != remote.md5:
            return False
        return bool(file_sha256(local) == entry["sha256"])
    except OSError:
        return False


STALE_AFTER_SECONDS = 24 * 3600


class PullCancelled(Exception):
    """Raised inside a download thread once another download has failed or Ctrl-C was pressed."""


def _staging_is_stale(path: Path, pid: int | None) -> bool:
    """A staging folder is stale when its pull's process is gone (or, on Windows, after a day)."""
    if pid == os.getpid():
        return False
    if os.name == "nt" or pid is None:
        try:
            return time.time() - path.stat().st_mtime > STALE_AFTER_SECONDS
        except OSError:
            return False
    return not _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_staging(dest: Path, run_id: str) -> None:
    """Remove staging folders of this run left by pulls that were killed."""
    for leftover in dest.glob(f".{run_id}.*"):
        parts = leftover.name.split(".")[2].split("-")
        pid = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        if not _staging_is_stale(leftover, pid):
            continue
        logger.info("removing %s left by an interrupted pull", leftover.name)
        shutil.rmtree(leftover, ignore_errors=True)


def _staging_dir(dest: Path, run_id: str) -> Path:
    try:
        dest.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{run_id}.partial-{os.getpid()}-", dir=dest))
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from a server's other user
        return staging
    except OSError as exc:
        raise DestinationNotWritable(
            f"cannot write to {dest} ({exc.strerror or exc.__class__.__name__})"
        ) from None


def _download_one(
    source: ArtifactSource,
    remote: RemoteFile,
    target: Path,
    bar: tqdm[Any],
    lock: threading.Lock,
    cancelled: threading.Event,
) -> dict[str, Any]:
    """Download one file with retries; verify its size (and MD5); return its manifest entry."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        if cancelled.is_set():
            raise PullCancelled(remote.path)
        written = 0

        def on_bytes(count: int) -> None:
            nonlocal written
            if cancelled.is_set():
                raise PullCancelled(remote.path)
            written += count
            with lock:
                bar.update(count)

        try:
            with target.open("wb") as out:
                source.download(remote.path, out, on_bytes)
            size = target.stat().st_size
            if size != remote.size:
                raise TransientError(
                    remote.path,
                    ArtifactIntegrityError(
                        f"{remote.path}: got {size} bytes, the store lists {remote.size}"
                    ),
                )
            md5 = _file_md5(target) if remote.md5 else None
            if remote.md5 and md5 != remote.md5:
                raise TransientError(
                    remote.path,
                    ArtifactIntegrityError(
                        f"{remote.path}: MD5 {md5} differs from ETag {remote.md5}"
                    ),
                )
            return {"path": remote.path, "size": size, "sha256": file_sha256(target), "md5": md5}
        except TransientError as exc:
            with lock:
                bar.update(-written)
            if attempt == RETRY_ATTEMPTS:
                raise exc.final from None
            delay = RETRY_BACKOFF * 2 ** (attempt - 1)
            logger.warning("retrying %s in %.1f s (%s)", remote.path, delay, exc)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _sync_run(
    run_id: str,
    files: Sequence[RemoteFile],
    source: ArtifactSource,
    dest: Path,
    workers: int,
    progress: bool,
) -> PullResult:
    started = time.perf_counter()
    for remote in files:
        parts = PurePosixPath(remote.path).parts
        if not parts or remote.path.startswith(("/", "\\")) or ".." in parts or "\\" in remote.path:
            raise ArtifactIntegrityError(f"refusing artifact path {remote.path!r}: outside the run")
    run_dir = dest / run_id
    staging = _staging_dir(dest, run_id)
    try:
        _remove_stale_staging(dest, run_id)
        manifest = read_manifest(run_dir)
        kept = [f for f in files if _local_copy_matches(run_dir, f, manifest)]
        missing = [f for f in files if f not in kept]
        if not missing and len(manifest) == len(files):
            shutil.rmtree(staging, ignore_errors=True)
            return PullResult(
                run_id, run_dir, run_dir / "artifacts" / MODEL_ARTIFACT, len(files), 0, 0, 0.0
            )
        entries = {}
        for remote in kept:
            target = staging / "artifacts" / remote.path
            target.parent.mkdir(parents=True, exist_ok=True)
            copy_file(run_dir / "artifacts" / remote.path, target)
            entries[remote.path] = manifest[remote.path]
        lock = threading.Lock()
        total = sum(f.size for f in missing)
        with (
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"pull {run_id[:8]}",
                disable=not progress,
            ) as bar,
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        ):
            cancelled = threading.Event()
            futures = [
                pool.submit(
                    _download_one, source, f, staging / "artifacts" / f.path, bar, lock, cancelled
                )
                for f in missing
            ]
            try:
                for future in futures:
                    entry = future.result()
                    entries[entry["path"]] = entry
            except BaseException:
                cancelled.set()
                for future in futures:
                    future.cancel()
                raise
        (staging / MANIFEST_NAME).write_text(
            json.dumps(
                {"run_id": run_id, "files": sorted(entries.values(), key=lambda e: e["path"])}
            )
        )
        _swap_into_place(staging, run_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PullResult(
        run_id,
        run_dir,
        run_dir / "artifacts" / MODEL_ARTIFACT,
        len(files),
        len(missing),
        total,
        time.perf_counter() - started,
    )


def _swap_into_place(staging: Path, run_dir: Path) -> None:
    """Rename the complete staging folder to `run_dir`, moving an older copy aside first."""
    try:
        os.rename(staging, run_dir)
        return
    except OSError:
        if not run_dir.exists():
            raise
    retired = run_dir.with_name(f".{run_dir.name}.retired-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(run_dir, retired)
    os.rename(staging, run_dir)
    shutil.rmtree(retired, ignore_errors=True)


def pull_run_artifacts(
    run_id: str,
    dest: Path,
    store: StoreConfig,
    workers: int = DEFAULT_WORKERS,
    progress: bool = False,
    tracking: Tracking | None = None,
) -> PullResult:
    """Download all of the run's artifacts into `dest/<run_id>/artifacts/...`, atomically.

    Files already pulled and still matching (size and checksum) are reused, so a second pull of a
    complete run downloads nothing. Raises `ArtifactNotFound` if the run has no `model/model.pt`.
    """
    tracking = tracking or Tracking(store)
    artifact_uri = tracking.run_artifact_uri(run_id)
    source = artifact_source(artifact_uri, store, workers)
    files = source.list_files()
    if not any(f.path == MODEL_ARTIFACT for f in files):
        raise ArtifactNotFound(f"run {run_id} has no {MODEL_ARTIFACT} (at {artifact_uri})")
    return _sync_run(run_id, files, source, dest, workers, progress)


def parse_reference(reference: str) -> tuple[str, str, str | None]:
    """Classify a model reference: ("run", uuid, None), ("model", name, version/@alias) or
    ("path", reference, None)."""
    ref = reference.strip()
    if RUN_ID_PATTERN.match(ref):
        return ("run", ref, None)
    if match := RUNS_URI_PATTERN.match(ref):
        return ("run", match.group(1), None)
    if match := MODELS_URI_PATTERN.match(ref):
        name, version, alias = match.groups()
        return ("model", name, version if version else f"@{alias}")
    return ("path", ref, None)


def resolve_run_id(reference: str, store: StoreConfig, tracking: Tracking | None = None) -> str:
    """The run UUID behind a run UUID, `runs:/` or `models:/` reference."""
    kind, value, extra = parse_reference(reference)
    if kind == "run":
        return value
    if kind == "model":
        tracking = tracking or Tracking(store)
        assert extra is not None
        if extra.startswith("@"):
            return tracking.registered_run_id(value, None, extra[1:])
        return tracking.registered_run_id(value, extra, None)
    raise RunNotFound(
        f"{reference!r} is not a run UUID, runs:/<uuid>/model or models:/<name>/<version|@alias>"
    )


def _local_model(reference: str) -> ResolvedModel:
    """A model file or a pulled run's folder, checked against its pull's manifest if any."""
    path = Path(reference).expanduser()
    candidates = [path]
    if path.is_dir():
        candidates = [path / "artifacts" / MODEL_ARTIFACT, path / MODEL_ARTIFACT, path / "model.pt"]
    for candidate in candidates:
        if candidate.is_file() and candidate.stat().st_size > 0:
            resolved = candidate.resolve()
            run_dir = next((p for p in resolved.parents if RUN_ID_PATTERN.match(p.name)), None)
            manifest = run_dir / MANIFEST_NAME if run_dir else None
            if manifest and manifest.is_file() and not verify_pulled_run(manifest.parent):
                raise ArtifactIntegrityError(
                    f"{manifest.parent} no longer matches its pull's sizes and checksums; "
                    "pull it again"
                )
            return ResolvedModel(run_dir.name if run_dir else None, resolved)
    raise ModelNotFound(
        f"{reference!r} is neither a model file nor a run UUID, runs:/ or models:/ reference"
    )


def resolve_model(reference: str, models_dir: Path, store: StoreConfig) -> ResolvedModel:
    """Local path to a model.pt, run UUID, runs:/<uuid>/model, models:/<name>/<version>,
    models:/<name>@<alias> → pulled (if needed) into models_dir/<run uuid>/artifacts/... and
    verified.

    A run already pulled and intact (manifest sizes and SHA-256) is used without any network call;
    `models:/` references always ask the registry, since an alias may have moved.
    """
    kind, _, _ = parse_reference(reference)
    if kind == "path":
        return _local_model(reference)
    tracking = Tracking(store) if kind == "model" else None
    run_id = resolve_run_id(reference, store, tracking)
    run_dir = models_dir / run_id
    model_path = run_dir / "artifacts" / MODEL_ARTIFACT
    if model_path.is_file() and verify_pulled_run(run_dir):
        return ResolvedModel(run_id=run_id, model_path=model_path.resolve())
    result = pull_run_artifacts(run_id, models_dir, store, tracking=tracking)
    if not verify_pulled_run(result.run_dir):
        raise ArtifactIntegrityError(f"the pulled copy of run {run_id} does not verify")
    return ResolvedModel(run_id=run_id, model_path=result.model_path.resolve())
