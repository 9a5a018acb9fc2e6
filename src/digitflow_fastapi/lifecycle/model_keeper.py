"""Model swaps, decided outside the workers.

Run as `python -m digitflow_fastapi.lifecycle.model_keeper swap|watch`.

`swap` (started by the gunicorn master on SIGHUP, or by `watch`): resolve the configured model
reference again (pulling a run if needed), load it and run its golden self-test here, with one
thread, then publish it as the next generation in the state folder (see `model_state`); the
workers switch to it. A model that fails to load or to reproduce its golden answers is refused:
one log line, a refusal record, and nothing changes for the workers.

`watch` (started by the master when `MODEL_POLL_SECONDS` > 0 and `PRED_MODEL_URI` is a
`models:/` reference): asks the registry every N seconds which run the reference names, and
swaps (in its own process, which then keeps torch imported) when that is another run than the
one served and not one refused before. A registry that does not answer
only costs a warning (once per outage); serving never waits on it.

Both run as child processes so the master never imports torch or ONNX Runtime (its forked
workers must not inherit their thread pools) and never blocks its signal loop. Swaps are
serialised by a lock file in the state folder.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from digitflow.artifacts.refs import ServedModel, parse_reference, resolve_model
from digitflow.artifacts.run_layout import enclosing_run_id
from digitflow.digests import file_sha256
from digitflow.errors import DigitflowError, ModelNotFound
from digitflow_fastapi.lifecycle import model_state
from digitflow_fastapi.lifecycle.model_state import DesiredModel, ModelSource

MODULE = "digitflow_fastapi.lifecycle.model_keeper"

logger = logging.getLogger(MODULE)  # not `__name__`: run with `-m`, that is "__main__"


@dataclass(frozen=True)
class Candidate:
    """A model a swap may switch to: its local checkpoint, identity and digest."""

    model_path: Path
    model_uuid: str
    run_id: str | None
    sha256: str
    origin: str | None = None

    @property
    def key(self) -> str:
        """What a refusal remembers: the run, else the checkpoint's bytes."""
        return self.run_id or self.sha256

    @property
    def label(self) -> str:
        """How logs and `/ready` name it: its run, else its digest."""
        return self.run_id or f"sha256:{self.sha256[:16]}"


def _local_candidate(folder: Path, path: Path, configured_uuid: str | None) -> Candidate:
    if not path.is_file():
        raise ModelNotFound(f"no checkpoint at {path}")
    run_id = enclosing_run_id(path)
    copy, digest = model_state.snapshot_checkpoint(folder, path)
    return Candidate(copy, run_id or configured_uuid or "", run_id, digest, str(path.absolute()))


def resolve_candidate(folder: Path, source: ModelSource) -> Candidate:
    """The model the configured reference names now (a path is copied into the state folder)."""
    from digitflow.settings import read_core_settings
    from digitflow_fastapi.config import get_settings

    if source.model_path:
        return _local_candidate(folder, Path(source.model_path), source.model_uuid)
    if not source.model_uri:
        raise ModelNotFound("no PRED_MODEL_PATH or PRED_MODEL_URI to swap to")
    models_dir = get_settings().PRED_MODELS_DIR
    resolved = resolve_model(source.model_uri, models_dir, read_core_settings().store())
    if parse_reference(source.model_uri).kind == "path":
        return _local_candidate(folder, resolved.model_path, source.model_uuid)
    digest = file_sha256(resolved.model_path)
    uuid = resolved.run_id or source.model_uuid or ""
    return Candidate(resolved.model_path, uuid, resolved.run_id, digest)


def verify(candidate: Candidate) -> int:
    """Load the candidate and check its golden answers; the number checked, or an exception."""
    from digitflow.inference.selftest import load_checked_classifier
    from digitflow.settings import read_core_settings
    from digitflow_fastapi.config import get_settings

    settings = get_settings()
    _, report = load_checked_classifier(
        candidate.model_path,
        backend=settings.INFERENCE_BACKEND,
        use_cuda=settings.USE_CUDA,
        use_mps=settings.USE_MPS,
        num_threads=1,  # beside the serving workers: take one core at most
        cache_dir=read_core_settings().cache_dir(),
    )
    return report.golden_checked


@contextmanager
def _swap_lock(folder: Path) -> Iterator[None]:
    with (folder / model_state.LOCK_FILE).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _discard_snapshot(folder: Path, checkpoint: Path, current: DesiredModel) -> None:
    """Remove a refused model's copy (never the one being served)."""
    snapshots = (folder / model_state.SNAPSHOTS_DIR).absolute()
    if (
        checkpoint.parent.parent == snapshots
        and checkpoint.parent != Path(current.model_path).parent
    ):
        shutil.rmtree(checkpoint.parent, ignore_errors=True)


def swap(folder: Path, reason: str) -> str:
    """Resolve, verify and publish the configured model; returns what happened, in one word."""
    with _swap_lock(folder):
        source = model_state.read_source(folder)
        current = model_state.read_desired(folder)
        if source is None or current is None:
            logger.error("model swap: no model state in %s", folder)
            return "unresolved"
        try:
            candidate = resolve_candidate(folder, source)
        except DigitflowError as exc:
            logger.warning(
                "model swap (%s) skipped: %s; still serving %s", reason, exc, current.model_uuid
            )
            return "unresolved"
        if candidate.sha256 == current.sha256:
            logger.info("model swap (%s): already serving %s", reason, current.model_uuid)
            return "unchanged"
        try:
            checked = verify(candidate)
        except Exception as exc:  # any failure to load or check refuses the model
            detail = str(exc) if isinstance(exc, DigitflowError) else f"{type(exc).__name__}: {exc}"
            if candidate.origin:
                detail += f" (a copy of {candidate.origin})"
            model_state.record_refusal(folder, candidate.key, candidate.label, detail)
            _discard_snapshot(folder, candidate.model_path, current)
            logger.error(
                "model swap refused (%s): %s: %s; still serving %s",
                reason,
                candidate.label,
                detail,
                current.model_uuid,
            )
            return "refused"
        model_state.write_desired(
            folder,
            DesiredModel(
                generation=current.generation + 1,
                model_uuid=candidate.model_uuid,
                model_path=str(candidate.model_path),
                sha256=candidate.sha256,
                run_id=candidate.run_id,
                reason=reason,
                origin=candidate.origin,
            ),
        )
        logger.info(
            "model swap (%s): %s -> %s (generation %d, %d golden images reproduced)",
            reason,
            current.model_uuid,
            candidate.model_uuid,
            current.generation + 1,
            checked,
        )
        return "swapped"


def publish_start_model(folder: Path, source: ModelSource, served: ServedModel) -> DesiredModel:
    """Generation 0: the model the master resolved at start (a path is served from a copy)."""
    model_state.write_source(folder, source)
    path, origin = served.model_path, None
    run_id = enclosing_run_id(path)
    if source.model_path or (source.model_uri and parse_reference(source.model_uri).kind == "path"):
        path, digest = model_state.snapshot_checkpoint(folder, served.model_path)
        origin = str(served.model_path.absolute())
    else:
        digest = file_sha256(path)
    desired = DesiredModel(0, served.model_uuid, str(path), digest, run_id, "start", origin)
    model_state.write_desired(folder, desired)
    return desired


# Run by `python -E -P -c`: load digitflow and digitflow_fastapi from the very files the master
# imported (argv[1]: JSON name -> package folder), then the keeper. No folder goes on sys.path.
_BOOTSTRAP = """\
import importlib.util, json, sys
for name, folder in json.loads(sys.argv.pop(1)).items():
    spec = importlib.util.spec_from_file_location(
        name, folder + "/__init__.py", submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
from digitflow_fastapi.lifecycle.model_keeper import main
sys.exit(main())
"""


def _package_folders() -> dict[str, str]:
    """Where this process's `digitflow` and `digitflow_fastapi` packages live."""
    import digitflow
    import digitflow_fastapi

    return {
        package.__name__: str(Path(package.__file__ or "").resolve().parent)
        for package in (digitflow, digitflow_fastapi)
    }


def keeper_command(action: str, folder: Path, *options: str) -> list[str]:
    """The command line that runs `action` (`swap` or `watch`) for the state `folder`.

    Isolated (`-E -P`: `-I` but for the user's site-packages, where `pip install --user` puts
    the dependencies): neither the working folder nor PYTHON* variables (PYTHONPATH may name
    `.`) decide what it imports; a module planted in the master's working folder would
    otherwise run on the next SIGHUP. Site-packages still load, so installed and editable
    dependencies resolve as usual; the two packages themselves are loaded from the folders the
    master uses, by name only. The working folder stays the master's, so relative paths in the
    settings (PRED_MODEL_PATH, PRED_MODELS_DIR...) mean what they mean to the workers.
    """
    packages = json.dumps(_package_folders())
    argv = ["--state-dir", str(folder), *options]
    return [sys.executable, "-E", "-P", "-c", _BOOTSTRAP, packages, action, *argv]


def watch(folder: Path, every_s: float, parent_pid: int) -> None:
    """Poll the registry until the parent (the gunicorn master) is gone; swap when it moves."""
    from digitflow.artifacts.tracking import Tracking
    from digitflow.settings import read_core_settings

    source = model_state.read_source(folder)
    uri = (source.model_uri if source else None) or ""
    reference = parse_reference(uri)
    if reference.kind != "model":
        logger.error("model watch: PRED_MODEL_URI is not a models:/ reference; not polling")
        return
    store = read_core_settings().store()
    tracking: Tracking | None = None
    unreachable = False
    logger.info("model watch: polling %s every %gs", uri, every_s)
    while os.getppid() == parent_pid:
        time.sleep(every_s)
        try:
            tracking = tracking or Tracking(store)  # its constructor probes the server
            run_id = tracking.registered_run_id(reference.value, reference.version, reference.alias)
        except Exception as exc:  # the registry being down must never stop the poller
            if not unreachable:
                logger.warning("model watch: registry did not answer (%s); still serving", exc)
            unreachable = True
            continue
        if unreachable:
            logger.info("model watch: registry answers again")
            unreachable = False
        current = model_state.read_desired(folder)
        if current is None or run_id == current.run_id:
            continue
        if run_id in model_state.read_refusals(folder).candidates:
            continue  # refused once (logged then); wait for the reference to move again
        try:
            swap(folder, "alias")  # here, not in a new process: mlflow is imported already
        except Exception:  # the poller outlives any one failed swap
            logger.exception("model watch: the swap failed; still serving")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child processes the gunicorn master starts."""
    parser = argparse.ArgumentParser(prog=MODULE)
    parser.add_argument("action", choices=["swap", "watch"])
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--reason", default="hup")
    parser.add_argument("--every", type=float, default=30.0)
    parser.add_argument("--parent-pid", type=int, default=0)
    args = parser.parse_args(argv)
    from digitflow.logging_setup import configure_logging_from_file
    from digitflow_fastapi.config import get_settings

    try:
        configure_logging_from_file(get_settings().LOGGER_CONFIG_PATH)
    except DigitflowError as exc:
        sys.stderr.write(f"model keeper: {exc}\n")
        return 2
    if args.action == "watch":
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(5, int(args.every) + 1)))
        watch(args.state_dir, args.every, args.parent_pid or os.getppid())
        return 0
    outcome = swap(args.state_dir, args.reason)
    return 0 if outcome in ("swapped", "unchanged") else 1


if __name__ == "__main__":
    sys.exit(main())
