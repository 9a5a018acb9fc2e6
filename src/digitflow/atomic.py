"""Write a file or replace a folder so that a reader sees the old or the new one, never half.

Files are written to a temporary name beside the target, flushed and `fsync`ed, then renamed
over it; a failure leaves the target untouched and no temporary file behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(
    path: Path, write: Callable[[BinaryIO], object], mode: int = 0o644, durable: bool = True
) -> None:
    """Create or replace `path` with what `write` writes to the open file it is given.

    `durable=False` skips the `fsync` (for files rewritten every second that need only atomicity).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            if durable:
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomically(
    path: Path, data: bytes, mode: int = 0o644, durable: bool = True
) -> None:
    """Create or replace `path` with `data`."""
    write_atomically(path, lambda out: out.write(data), mode, durable)


def write_text_atomically(path: Path, text: str, mode: int = 0o644, durable: bool = True) -> None:
    """Create or replace `path` with `text` as UTF-8."""
    write_bytes_atomically(path, text.encode("utf-8"), mode, durable)


def replace_folder(staging: Path, target: Path) -> None:
    """Move the complete folder `staging` to `target`, replacing an older `target`.

    The older copy is renamed aside first and removed afterwards, so `target` is missing for the
    moment between two renames.
    """
    try:
        os.rename(staging, target)
        return
    except OSError:
        if not target.exists():
            raise
    retired = target.with_name(f".{target.name}.retired-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(target, retired)
    os.rename(staging, target)
    shutil.rmtree(retired, ignore_errors=True)
