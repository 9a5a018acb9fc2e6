"""An in-memory artifact source for pull tests that need no server."""

from __future__ import annotations

import threading
import time
from typing import Any, BinaryIO

from digitflow.artifacts.sources import RemoteFile, TransientError
from digitflow.errors import StorageUnavailable


class FlakySource:
    """An artifact source that breaks off the first `failures` downloads of each file."""

    description = "flaky"

    def __init__(self, files: dict[str, bytes], failures: int = 0, short: bool = False) -> None:
        self.files = files
        self.failures = failures
        self.short = short
        self.calls: dict[str, int] = {}
        self.active = 0
        self.peak = 0
        self.lock = threading.Lock()

    def list_files(self) -> list[RemoteFile]:
        return [RemoteFile(p, len(b)) for p, b in self.files.items()]

    def download(self, path: str, out: BinaryIO, on_bytes: Any) -> None:
        with self.lock:
            self.calls[path] = self.calls.get(path, 0) + 1
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            time.sleep(0.05)
            body = self.files[path]
            if self.calls[path] <= self.failures or self.short:
                out.write(body[: len(body) // 2])
                raise TransientError(path, StorageUnavailable("connection reset"))
            out.write(body)
            on_bytes(len(body))
        finally:
            with self.lock:
                self.active -= 1


def fake_files() -> dict[str, bytes]:
    files = {f"extra/{i}.bin": bytes([i]) * (1000 + i) for i in range(6)}
    files["model/model.pt"] = b"weights" * 100
    return files
