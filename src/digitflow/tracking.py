"""MLflow tracking: the embedded default store or a remote server, checked before use.

With no tracking URI the runs go to an embedded store inside the project (`mlruns/mlflow.db`, a
SQLite file, and `mlruns/artifacts/`, both git-ignored). With one, the server is probed first with a
short timeout so an unreachable server or refused credentials give one clear line instead of
MLflow's minutes of retries. MLflow itself reads `MLFLOW_TRACKING_USERNAME` / `_PASSWORD`.
"""

from __future__ import annotations

import base64
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from digitflow.errors import TrackingAuthError, TrackingUnavailable

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "digitflow"
PROBE_PATH = "/api/2.0/mlflow/experiments/search?max_results=1"


@dataclass(frozen=True)
class TrackingTarget:
    """Where runs go: the URI, and for the embedded store the folder artifacts land in."""

    uri: str
    artifact_root: Path | None = None

    @property
    def embedded(self) -> bool:
        """True for the project's own SQLite + folder store."""
        return self.artifact_root is not None

    def client(self) -> MlflowClient:
        """An MLflow client bound to this target."""
        return MlflowClient(tracking_uri=self.uri)


def embedded_target(mlruns_dir: Path) -> TrackingTarget:
    """The project's embedded store under `mlruns_dir` (created if missing)."""
    mlruns_dir = mlruns_dir.resolve()
    (mlruns_dir / "artifacts").mkdir(parents=True, exist_ok=True)
    return TrackingTarget(
        uri=f"sqlite:///{mlruns_dir / 'mlflow.db'}", artifact_root=mlruns_dir / "artifacts"
    )


def probe_server(
    uri: str, username: str | None, password: str | None, timeout: float = 5.0
) -> None:
    """Raise `TrackingUnavailable` / `TrackingAuthError` unless the server answers an API call."""
    request = urllib.request.Request(uri.rstrip("/") + PROBE_PATH)
    if username:
        token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
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
        if tracking_uri.startswith(("http://", "https://")):
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
