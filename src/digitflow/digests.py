"""File digests: the one place a file is read to be hashed (pull manifests, model swaps, ONNX
export names)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_md5(path: Path) -> str:
    """Hex MD5 of a file's bytes (compared with an object store's ETag; not for security)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()
