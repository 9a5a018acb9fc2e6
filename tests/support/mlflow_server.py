"""A real `mlflow server` process on 127.0.0.1 for tests (SQLite backend)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from tests.support.processes import ServerProcess, free_port, start_process, wait_for_http

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def launch_mlflow_server(
    workdir: Path,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start `mlflow server` (SQLite store in `workdir`) without waiting for it to answer.

    Lets a fixture start several servers at once and wait for them together.
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
    return start_process(
        command, workdir / "mlflow-server.log", f"http://127.0.0.1:{port}", env=env
    )


def start_mlflow_server(
    workdir: Path,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> ServerProcess:
    """Start `mlflow server` with a SQLite store in `workdir`; `extra_args` choose artifacts/auth.

    Without `extra_args` artifacts go to a local folder in `workdir` (plain file artifact root).
    """
    server = launch_mlflow_server(workdir, extra_args, env)
    wait_for_http(server, "/health", timeout)
    return server


def basic_auth_env(workdir: Path, admin: str, password: str) -> dict[str, str]:
    """Environment for `mlflow server --app-name basic-auth` with `admin`/`password` as admin.

    MLflow 3 reads its auth settings from the INI file named by MLFLOW_AUTH_CONFIG_PATH and creates
    the admin user on first start; the users live in their own SQLite file in `workdir`.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{workdir / 'basic_auth.db'}\n"
        f"admin_username = {admin}\n"
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "digitflow-tests-secret",
    }
