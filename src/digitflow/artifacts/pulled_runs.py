"""The folders of pulled runs: one pull at a time per run, and a swap readers never see half-done.

`<models_dir>/<run uuid>` is a symbolic link to a complete, hidden version folder
(`.<run uuid>.v<ns>`). A new version is written into a staging folder
(`.<run uuid>.partial-<pid>-*`), renamed to a version name, and published by replacing the link
in one `rename`: a reader opening `<run uuid>/artifacts/model/model.pt` finds the old copy or the
new one, whole, never a gap or a manifest from one and a file from the other. The two versions
before the published one are kept, so a reader that resolved an older link can still open it.
A lock file (`.<run uuid>.lock`, `flock`) makes concurrent pulls of one run take turns: the second
finds the first's copy complete and downloads nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from digitflow.errors import DestinationNotWritable

logger = logging.getLogger(__name__)

STALE_AFTER_SECONDS = 24 * 3600
KEPT_VERSIONS = 3  # the published one and two before it, for readers that resolved them


def _not_writable(dest: Path, exc: OSError) -> DestinationNotWritable:
    return DestinationNotWritable(
        f"cannot write to {dest} ({exc.strerror or exc.__class__.__name__})"
    )


@contextlib.contextmanager
def run_lock(dest: Path, run_id: str) -> Iterator[None]:
    """Hold the run's pull lock (blocking) for the duration of the block."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
        fd = os.open(dest / f".{run_id}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise _not_writable(dest, exc) from None
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock, pulls stay atomic
            yield
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def staging_dir(dest: Path, run_id: str) -> Path:
    """A new, empty staging folder for a pull of `run_id` by this process."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{run_id}.partial-{os.getpid()}-", dir=dest))
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from a server's other user
        return staging
    except OSError as exc:
        raise _not_writable(dest, exc) from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def remove_stale_staging(dest: Path, run_id: str) -> None:
    """Remove staging folders of this run left by pulls that were killed."""
    for leftover in dest.glob(f".{run_id}.partial-*"):
        parts = leftover.name.split(".partial-", 1)[1].split("-")
        pid = int(parts[0]) if parts and parts[0].isdigit() else None
        if _staging_is_stale(leftover, pid):
            logger.info("removing %s left by an interrupted pull", leftover.name)
            shutil.rmtree(leftover, ignore_errors=True)


def _versions(dest: Path, run_id: str) -> list[Path]:
    """The run's version folders, oldest first."""
    found = [p for p in dest.glob(f".{run_id}.v*") if p.name[len(run_id) + 3 :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(run_id) + 3 :]))


def publish(staging: Path, dest: Path, run_id: str) -> Path:
    """Make the complete `staging` folder the run's current copy; return `<dest>/<run uuid>`.

    Call with the run's lock held.
    """
    link = dest / run_id
    version = dest / f".{run_id}.v{time.time_ns()}"
    os.rename(staging, version)
    if link.is_dir() and not link.is_symlink():  # a real folder from an older digitflow
        os.rename(link, dest / f".{run_id}.v0")
    temporary = dest / f".{run_id}.link-{os.getpid()}"
    temporary.unlink(missing_ok=True)
    os.symlink(version.name, temporary)
    os.replace(temporary, link)
    for old in _versions(dest, run_id)[:-KEPT_VERSIONS]:
        shutil.rmtree(old, ignore_errors=True)
    return link
