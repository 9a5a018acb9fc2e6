"""The per-server model state folder: which model every worker should serve, and what was refused.

The gunicorn master makes the folder (`DIGITFLOW_MODEL_STATE_DIR`, see `handoff`) and writes the
model decided at start as generation 0: this is how its workers read that decision. A swap
(`SIGHUP`, or a moved registry alias) is verified outside the workers by
`digitflow_fastapi.lifecycle.model_keeper`, which writes the next generation only once the new
model loaded and reproduced its golden answers, or a refusal record otherwise. Workers only read:
they poll `desired.json` and switch when its generation grows, and a worker that (re)boots serves
the newest generation, not the start-up model.

Files, each replaced atomically (a reader sees the old or the new one, never half):
- `source.json`: the model reference as configured at start: what a swap resolves again;
- `desired.json`: generation, model uuid, run id, checkpoint path, its SHA-256;
- `refusals.json`: how many swaps were refused, the last one, and the candidates refused.

This module is torch-free: the master imports it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from digitflow.artifacts.run_layout import companion_files
from digitflow.atomic import write_text_atomically
from digitflow.digests import file_sha256

SOURCE_FILE = "source.json"
DESIRED_FILE = "desired.json"
REFUSALS_FILE = "refusals.json"
LOCK_FILE = "swap.lock"
SNAPSHOTS_DIR = "snapshots"


@dataclass(frozen=True)
class ModelSource:
    """The model reference as configured at start: what a swap resolves again."""

    model_path: str | None
    model_uri: str | None
    model_uuid: str | None


@dataclass(frozen=True)
class DesiredModel:
    """One generation of the served model: every worker converges on the newest."""

    generation: int
    model_uuid: str
    model_path: str
    sha256: str
    run_id: str | None = None
    reason: str = "start"
    origin: str | None = None  # the file it was copied from, when given by path


@dataclass
class Refusals:
    """Swaps refused so far; `candidates` (run ids or SHA-256s) are not retried by the poller."""

    count: int = 0
    last: dict[str, str] | None = None
    candidates: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    write_text_atomically(path, json.dumps(payload), durable=False)


def write_source(folder: Path, source: ModelSource) -> None:
    _write_json(folder / SOURCE_FILE, asdict(source))


def read_source(folder: Path) -> ModelSource | None:
    payload = _read_json(folder / SOURCE_FILE)
    if payload is None:
        return None
    return ModelSource(
        payload.get("model_path"), payload.get("model_uri"), payload.get("model_uuid")
    )


def write_desired(folder: Path, desired: DesiredModel) -> None:
    _write_json(folder / DESIRED_FILE, asdict(desired))


def read_desired(folder: Path) -> DesiredModel | None:
    """The newest generation, or None when there is none (or it cannot be read)."""
    payload = _read_json(folder / DESIRED_FILE)
    try:
        return DesiredModel(**payload) if payload is not None else None
    except TypeError:
        return None


def read_refusals(folder: Path) -> Refusals:
    payload = _read_json(folder / REFUSALS_FILE) or {}
    try:
        return Refusals(**payload)
    except TypeError:
        return Refusals()


def record_refusal(folder: Path, candidate: str, model_uuid: str, reason: str) -> Refusals:
    """Count one refused swap and remember its candidate (a run id or a SHA-256)."""
    refusals = read_refusals(folder)
    refusals.count += 1
    refusals.last = {
        "model_uuid": model_uuid,
        "reason": reason[:500],
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if candidate not in refusals.candidates:
        refusals.candidates = [*refusals.candidates, candidate][-100:]
    _write_json(folder / REFUSALS_FILE, asdict(refusals))
    return refusals


def snapshot_checkpoint(folder: Path, checkpoint: Path) -> tuple[Path, str]:
    """Copy a checkpoint given by path (and the files beside it that go with it: golden set,
    ONNX graph, MLmodel) into the state folder.

    A file given by path can be replaced or corrupted later; workers (respawned ones too) load
    the copy that was verified, named by the digests of all. Returns the copy and the
    checkpoint's SHA-256.
    """
    staging = folder / SNAPSHOTS_DIR / f".staging-{time.time_ns()}"
    staging.mkdir(parents=True)
    copy = staging / checkpoint.name  # messages about the copy still name the file
    shutil.copyfile(checkpoint, copy)
    digests = [file_sha256(copy)]
    for companion in companion_files(checkpoint):
        if companion.is_file():
            shutil.copyfile(companion, staging / companion.name)
            digests.append(f"{companion.name}={file_sha256(staging / companion.name)}")
    name = hashlib.sha256(":".join(digests).encode()).hexdigest()[:32]
    target = folder / SNAPSHOTS_DIR / name
    if target.is_dir():
        shutil.rmtree(staging, ignore_errors=True)
    else:
        staging.rename(target)
    return target / checkpoint.name, digests[0]
