"""A real `mlflow server` process on 127.0.0.1 for tests (SQLite backend)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from tests.support.processes import ServerProcess, free_port, start_process, wait_for_http

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def start_mlflow_server(
    workdir: Path,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> ServerProcess:
    """Start `mlflow server` with a SQLite store in `workdir`; `extra_args` choose artifacts/auth.

    Without `extra_args` artifacts go to a local folder in `workdir` (plain file artifact root).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = list(extra_args) or ["--default-artifact-root", (workdir / "artifacts").as_uri()]
    command = [
        MLFLOW,
        "server",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        *args,
    ]
    server = start_process(
        command, workdir / "mlflow-server.log", f"http://127.0.0.1:{port}", env=env
    )
    wait_for_http(server, "/health", timeout)
    return server
