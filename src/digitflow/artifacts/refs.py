"""Model references (a run UUID, `runs:/`, `models:/name/version`, `models:/name@alias`, a path)
made into one pinned run id and local checkpoint, and the one decision of which model to serve
(`pin_served_model`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from digitflow.artifacts.run_layout import (
    CHECKPOINT_FILENAME,
    MANIFEST_NAME,
    MODEL_ARTIFACT,
    RUNS_URI_PATTERN,
    enclosing_run_dir,
    is_run_id,
    model_path,
    run_dir,
)
from digitflow.errors import ArtifactIntegrityError, ConfigError, ModelNotFound, RunNotFound
from digitflow.settings import StoreConfig

if TYPE_CHECKING:  # MLflow is imported only when a reference needs the tracking server
    from digitflow.artifacts.tracking import Tracking

logger = logging.getLogger(__name__)

MODELS_URI_PATTERN = re.compile(r"models:/([^/@]+)(?:/([^/@]+)|@([^/@]+))/?\Z")


@dataclass(frozen=True)
class ModelReference:
    """A parsed reference: a run, a registered model version or alias, or a local path."""

    kind: Literal["run", "model", "path"]
    value: str
    version: str | None = None
    alias: str | None = None


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference made local: the run it came from (if known) and its checkpoint."""

    run_id: str | None
    model_path: Path


def parse_reference(reference: str) -> ModelReference:
    """Classify a model reference (whitespace around it is ignored)."""
    ref = reference.strip()
    if is_run_id(ref):
        return ModelReference("run", ref)
    if match := RUNS_URI_PATTERN.match(ref):
        return ModelReference("run", match.group(1))
    if match := MODELS_URI_PATTERN.match(ref):
        name, version, alias = match.groups()
        return ModelReference("model", name, version=version, alias=alias)
    return ModelReference("path", ref)


def resolve_run_id(reference: str, store: StoreConfig, tracking: Tracking | None = None) -> str:
    """The run UUID behind a run UUID, `runs:/` or `models:/` reference."""
    parsed = parse_reference(reference)
    if parsed.kind == "run":
        return parsed.value
    if parsed.kind == "model":
        from digitflow.artifacts.tracking import Tracking

        tracking = tracking or Tracking(store)
        run_id = tracking.registered_run_id(parsed.value, parsed.version, parsed.alias)
        if not is_run_id(run_id):  # becomes a folder name under models/: never a path
            raise RunNotFound(f"{reference!r}: the registry named a run id that is not a run UUID")
        return run_id
    raise RunNotFound(
        f"{reference!r} is not a run UUID, runs:/<uuid>/model or models:/<name>/<version|@alias>"
    )


def _local_model(reference: str) -> ResolvedModel:
    """A model file or a pulled run's folder, checked against its pull's manifest if any."""
    from digitflow.artifacts.pull import verify_pulled_run

    path = Path(reference).expanduser()
    candidates = [path]
    if path.is_dir():
        candidates = [model_path(path), path / MODEL_ARTIFACT, path / CHECKPOINT_FILENAME]
    for candidate in candidates:
        if candidate.is_file() and candidate.stat().st_size > 0:
            resolved = candidate.absolute()  # keep `<run uuid>/...`: the link, not its target
            folder = enclosing_run_dir(resolved)
            manifest = folder / MANIFEST_NAME if folder else None
            if manifest and manifest.is_file() and not verify_pulled_run(manifest.parent):
                raise ArtifactIntegrityError(
                    f"{manifest.parent} no longer matches its pull's sizes and checksums; "
                    "pull it again"
                )
            return ResolvedModel(folder.name if folder else None, resolved)
    raise ModelNotFound(
        f"{reference!r} is neither a model file nor a run UUID, runs:/ or models:/ reference"
    )


def resolve_model(reference: str, models_dir: Path, store: StoreConfig) -> ResolvedModel:
    """Local path, run UUID, `runs:/<uuid>/model`, `models:/<name>/<version>` or
    `models:/<name>@<alias>` → pulled (if needed) into `models_dir/<run uuid>/artifacts/...` and
    verified.

    A run already pulled and intact (manifest sizes and SHA-256) is used without any network call;
    `models:/` references always ask the registry, since an alias may have moved.
    """
    kind = parse_reference(reference).kind
    if kind == "path":
        return _local_model(reference)
    from digitflow.artifacts.pull import pull_run_artifacts, verify_pulled_run
    from digitflow.artifacts.tracking import Tracking

    tracking = Tracking(store) if kind == "model" else None
    run_id = resolve_run_id(reference, store, tracking)
    folder = run_dir(models_dir, run_id)
    if model_path(folder).is_file() and verify_pulled_run(folder):
        return ResolvedModel(run_id=run_id, model_path=model_path(folder).absolute())
    result = pull_run_artifacts(run_id, models_dir, store, tracking=tracking)
    if not verify_pulled_run(result.run_dir):
        raise ArtifactIntegrityError(f"the pulled copy of run {run_id} does not verify")
    return ResolvedModel(run_id=run_id, model_path=result.model_path.absolute())


# The environment variable `digitflow serve` hands its decision (a `ModelPin` as JSON) on in, to
# the gunicorn master or Ray driver it then becomes (it execs them, in the same process).
PIN_VARIABLE: Final = "DIGITFLOW_SERVED_MODEL"


@dataclass(frozen=True)
class ModelPin:
    """Which model a server serves, decided once per start (`pin_served_model`).

    A checkpoint path, or a run as `runs:/<run id>/model` (a registry alias that moves later does
    not move it), and the UUID the API reports. Every process of the server reads this decision;
    none decides again (a model swap is a new decision, verified first: see the server's
    `lifecycle.model_keeper`).
    """

    model_path: str | None
    model_uri: str | None
    model_uuid: str

    def to_json(self) -> str:
        """The pin as JSON, for `PIN_VARIABLE`."""
        return json.dumps(dataclasses.asdict(self))


@dataclass(frozen=True)
class ServedModel:
    """The pinned model on this machine: a local checkpoint and the UUID the API reports."""

    model_path: Path
    model_uuid: str


def pin_served_model(
    model_path: Path | None,
    model_uri: str | None,
    model_uuid: str | None,
    store: StoreConfig,
) -> ModelPin:
    """Decide which model to serve: the one place this is decided, once per server start.

    `model_path` (PRED_MODEL_PATH) wins and must be a file. Else `model_uri` (PRED_MODEL_URI): a
    local path is checked (against its pull's manifest, if any); a run or registry reference is
    pinned to its run id (the registry is asked here), without downloading it. `model_uuid`
    (PRED_MODEL_UUID) is what the API reports; when it is not given, the run the model came from.
    """
    if model_path is not None:
        if not model_path.is_file():
            raise ModelNotFound(f"no checkpoint at {model_path} (PRED_MODEL_PATH)")
        return ModelPin(str(model_path), None, model_uuid or "")
    if model_uri:
        if parse_reference(model_uri).kind == "path":
            local = _local_model(model_uri)
            return ModelPin(str(local.model_path), None, model_uuid or local.run_id or "")
        run_id = resolve_run_id(model_uri, store)
        return ModelPin(None, f"runs:/{run_id}/model", model_uuid or run_id)
    raise ConfigError("set PRED_MODEL_PATH (or PRED_MODEL_URI) to the model to serve")


def served_model_of(pin: ModelPin, models_dir: Path, store: StoreConfig) -> ServedModel:
    """The pinned model made local: its path, or its run pulled into `models_dir` (only if it is
    not there and intact). Decides nothing: the run is the pinned one."""
    if pin.model_path is not None:
        path = Path(pin.model_path)
        if not path.is_file():
            raise ModelNotFound(f"no checkpoint at {path}")
        return ServedModel(path, pin.model_uuid)
    if not pin.model_uri:
        raise ConfigError("the model pin names neither a checkpoint nor a run")
    return ServedModel(resolve_model(pin.model_uri, models_dir, store).model_path, pin.model_uuid)
