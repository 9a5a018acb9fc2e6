"""MLflow tracking: where runs are logged, and read access to experiments, runs and the registry.

With no tracking URI the runs go to an embedded store inside the project (`mlruns/mlflow.db`, a
SQLite file, and `mlruns/artifacts/`, both git-ignored). With one, the server is probed first with a
short timeout so an unreachable server or refused credentials give one clear line instead of
MLflow's minutes of retries; the reader then hands MLflow's REST stores the credentials directly.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.store.model_registry.rest_store import RestStore as RegistryRestStore
from mlflow.store.tracking.rest_store import RestStore
from mlflow.tracking import MlflowClient
from mlflow.utils.rest_utils import MlflowHostCreds

from digitflow.artifacts.run_layout import (
    EMBEDDED_ARTIFACT_ROOT,
    EMBEDDED_STORE_DB,
    RUNS_URI_PATTERN,
    is_run_id,
)
from digitflow.errors import (
    ArtifactNotFound,
    ConfigError,
    ExperimentNotFound,
    RegisteredModelNotFound,
    RunNotFound,
    TrackingAuthError,
    TrackingUnavailable,
)
from digitflow.settings import DEFAULT_EXPERIMENT, StoreConfig, is_remote_uri

logger = logging.getLogger(__name__)

PROBE_PATH = "/api/2.0/mlflow/experiments/search?max_results=1"


@dataclass(frozen=True)
class TrackingTarget:
    """Where runs go: the URI, and for the embedded store the folder artifacts land in."""

    uri: str
    artifact_root: Path | None = None

    def client(self) -> MlflowClient:
        """An MLflow client bound to this target."""
        return MlflowClient(tracking_uri=self.uri)


def sql_store_available() -> bool:
    """True when MLflow can open a SQL store: full MLflow (SQLAlchemy), not mlflow-skinny alone."""
    return importlib.util.find_spec("sqlalchemy") is not None


def embedded_target(mlruns_dir: Path) -> TrackingTarget:
    """The project's embedded store under `mlruns_dir` (created if missing).

    A slim install (mlflow-skinny) talks to tracking servers only: asked for the embedded store,
    it says so in one line rather than with MLflow's unsupported-URI traceback.
    """
    mlruns_dir = mlruns_dir.resolve()
    if not sql_store_available():
        raise ConfigError(
            f"no tracking server is set, and the embedded store ({mlruns_dir / EMBEDDED_STORE_DB}) "
            "needs full MLflow, which this install lacks: set MLFLOW_TRACKING_URI (or "
            "--tracking-uri) to an MLflow server, or pip install 'digitflow[train]'"
        )
    artifact_root = mlruns_dir / EMBEDDED_ARTIFACT_ROOT
    artifact_root.mkdir(parents=True, exist_ok=True)
    return TrackingTarget(
        uri=f"sqlite:///{mlruns_dir / EMBEDDED_STORE_DB}", artifact_root=artifact_root
    )


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or default


class _SameOriginCredentials(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but carry the Basic credentials only to the origin they were meant for.

    The credentials are an unredirected header (urllib drops those on every redirect); they are
    put back only when the redirect stays on the same scheme, host and port, so a server (or
    anyone able to answer in its place) cannot send them on to another host.
    """

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        follow = super().redirect_request(req, fp, code, msg, headers, newurl)
        credentials = req.unredirected_hdrs.get("Authorization")
        if follow is not None and credentials and _origin(newurl) == _origin(req.full_url):
            follow.add_unredirected_header("Authorization", credentials)
        return follow


def probe_server(
    uri: str, username: str | None, password: str | None, timeout: float = 5.0
) -> None:
    """Raise `TrackingUnavailable` / `TrackingAuthError` unless the server answers an API call."""
    request = urllib.request.Request(uri.rstrip("/") + PROBE_PATH)
    if username:
        token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
        request.add_unredirected_header("Authorization", f"Basic {token}")
    opener = urllib.request.build_opener(_SameOriginCredentials)
    try:
        with opener.open(request, timeout=timeout) as response:
            response.read(1)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            hint = "wrong" if username else "missing"
            raise TrackingAuthError(
                f"MLflow server {uri} refused the credentials (HTTP {exc.code}); "
                f"check MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD ({hint})"
            ) from None
        raise TrackingUnavailable(f"MLflow server {uri} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnavailable(
            f"MLflow server {uri} did not answer within {timeout:g} s ({reason})"
        ) from None


def connect(
    tracking_uri: str | None,
    mlruns_dir: Path,
    username: str | None = None,
    password: str | None = None,
    timeout: float = 5.0,
) -> TrackingTarget:
    """Resolve and check the tracking target, and make it MLflow's current one."""
    if tracking_uri:
        if is_remote_uri(tracking_uri):
            probe_server(tracking_uri, username, password, timeout)
        target = TrackingTarget(uri=tracking_uri)
    else:
        target = embedded_target(mlruns_dir)
    mlflow.set_tracking_uri(target.uri)
    return target


def ensure_experiment(target: TrackingTarget, name: str) -> str:
    """The id of experiment `name`, created if missing (embedded: artifacts inside `mlruns/`)."""
    client = target.client()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    location = target.artifact_root.as_uri() if target.artifact_root is not None else None
    return str(client.create_experiment(name, artifact_location=location))


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


def _run_summary(run: Any) -> RunSummary:
    started = run.info.start_time
    metrics = run.data.metrics
    return RunSummary(
        run_id=str(run.info.run_id),
        run_name=str(run.info.run_name or ""),
        start_time=datetime.fromtimestamp(started / 1000, UTC) if started else None,
        status=str(run.info.status),
        test_accuracy=metrics.get("test_accuracy"),
        test_loss=metrics.get("test_loss"),
    )


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
        """Every active experiment with its artifact location."""
        with self._errors("experiments"):
            found = self.runs.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000)
        return [
            ExperimentInfo(str(e.experiment_id), str(e.name), str(e.artifact_location))
            for e in found
        ]

    def experiment(self, name: str) -> ExperimentInfo:
        """The experiment called `name`; `ExperimentNotFound` if there is none."""
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
        if not is_run_id(run_id):
            raise RunNotFound(f"{run_id!r} is not a run UUID (32 hex digits)")
        try:
            with self._errors(f"run {run_id}"):
                run = self.runs.get_run(run_id)
        except LookupError:
            raise RunNotFound(f"no run with UUID {run_id} at {self.uri}") from None
        return str(run.info.artifact_uri)

    def recent_runs(self, experiment: ExperimentInfo, max_results: int) -> list[RunSummary]:
        """The experiment's active runs, newest first."""
        with self._errors(f"runs of {experiment.name!r}"):
            found = self.runs.search_runs(
                experiment_ids=[experiment.experiment_id],
                filter_string="",
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=max_results,
                order_by=["attributes.start_time DESC"],
            )
        return [_run_summary(run) for run in found]

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
        if not is_run_id(str(run_id)):  # it names a folder under models/: check before any path
            raise RunNotFound(
                f"{label}: the registry names run {str(run_id)[:80]!r}, not a run UUID "
                "(32 lowercase hex digits)"
            )
        return str(run_id)


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
