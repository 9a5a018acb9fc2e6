"""Pulling a run's artifacts into the local models folder: manifest, staging, download, swap.

A pull lands in `<models_dir>/<run uuid>/artifacts/...` (the seed's layout). It is written into a
hidden temporary folder beside it and renamed into place, so a crash or Ctrl-C never leaves a
half-written `model.pt` where a server would load it. A manifest of sizes and SHA-256 digests
(`<run uuid>/.digitflow-manifest.json`) lets a second pull, and `model_refs`, check the copy
without downloading it again. Artifacts are read through the MLflow server's artifact proxy
(`mlflow-artifacts:`), straight from S3-compatible storage (`s3://`), or from a local folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from digitflow.artifacts.pulled_runs import publish, remove_stale_staging, run_lock, staging_dir
from digitflow.artifacts.run_layout import (
    CONFIG_ARTIFACT,
    MANIFEST_NAME,
    MODEL_ARTIFACT,
    artifact_path,
    model_path,
)
from digitflow.artifacts.sources import (
    ArtifactSource,
    LocalSource,
    ProxySource,
    RemoteFile,
    S3Source,
    TransientError,
    copy_file,
)
from digitflow.artifacts.tracking import Tracking
from digitflow.atomic import write_text_atomically
from digitflow.digests import file_md5, file_sha256
from digitflow.errors import (
    ArtifactIntegrityError,
    ArtifactNotFound,
    UnsupportedArtifactLocation,
)
from digitflow.settings import DEFAULT_PULL_WORKERS, StoreConfig

logger = logging.getLogger(__name__)

RETRY_ATTEMPTS = 3
RETRY_BACKOFF = 0.5


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
        return artifact_path(self.run_dir, CONFIG_ARTIFACT)


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


def list_run_artifacts(run_id: str, store: StoreConfig) -> RunArtifacts:
    """Every file under the run's artifact root, recursively, with sizes."""
    artifact_uri = Tracking(store).run_artifact_uri(run_id)
    files = artifact_source(artifact_uri, store, DEFAULT_PULL_WORKERS).list_files()
    return RunArtifacts(run_id, artifact_uri, sorted(files, key=lambda f: f.path))


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
        local = artifact_path(run_dir, path)
        try:
            if local.stat().st_size != entry["size"] or file_sha256(local) != entry["sha256"]:
                return False
        except OSError:
            return False
    return True


def _local_copy_matches(run_dir: Path, remote: RemoteFile, manifest: Mapping[str, Any]) -> bool:
    """Whether the already pulled file equals `remote` (size, then MD5 or the recorded SHA-256)."""
    local = artifact_path(run_dir, remote.path)
    entry = manifest.get(remote.path)
    try:
        if entry is None or local.stat().st_size != remote.size:
            return False
        if remote.md5 and file_md5(local) != remote.md5:
            return False
        return bool(file_sha256(local) == entry["sha256"])
    except OSError:
        return False


class PullCancelled(Exception):
    """Raised inside a download thread once another download has failed or Ctrl-C was pressed."""


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
            md5 = file_md5(target) if remote.md5 else None
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
    with run_lock(dest, run_id):
        return _sync_locked(run_id, files, source, dest, workers, progress, started)


def _sync_locked(
    run_id: str,
    files: Sequence[RemoteFile],
    source: ArtifactSource,
    dest: Path,
    workers: int,
    progress: bool,
    started: float,
) -> PullResult:
    run_dir = dest / run_id
    staging = staging_dir(dest, run_id)
    try:
        remove_stale_staging(dest, run_id)
        manifest = read_manifest(run_dir)
        kept = [f for f in files if _local_copy_matches(run_dir, f, manifest)]
        missing = [f for f in files if f not in kept]
        if not missing and len(manifest) == len(files):
            shutil.rmtree(staging, ignore_errors=True)
            return PullResult(run_id, run_dir, model_path(run_dir), len(files), 0, 0, 0.0)
        entries = {}
        for remote in kept:
            target = artifact_path(staging, remote.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            copy_file(artifact_path(run_dir, remote.path), target)
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
                    _download_one, source, f, artifact_path(staging, f.path), bar, lock, cancelled
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
        manifest_entries = sorted(entries.values(), key=lambda e: e["path"])
        write_text_atomically(
            staging / MANIFEST_NAME, json.dumps({"run_id": run_id, "files": manifest_entries})
        )
        publish(staging, dest, run_id)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PullResult(
        run_id,
        run_dir,
        model_path(run_dir),
        len(files),
        len(missing),
        total,
        time.perf_counter() - started,
    )


def pull_run_artifacts(
    run_id: str,
    dest: Path,
    store: StoreConfig,
    workers: int = DEFAULT_PULL_WORKERS,
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
