"""Session fixtures for the artifact tests: a real S3 server and three real MLflow servers.

- `mlflow_stack`: SeaweedFS (`weed server -s3`, one accepted access key, a bucket `mlflow`) and
  three `mlflow server` processes (SQLite) storing artifacts in that S3 server:
  `proxy` (artifact proxy, `mlflow-artifacts:` locations), `plain` (a plain `s3://` root the client
  reads itself) and `auth` (artifact proxy behind basic auth). They start together to save time.
- `stack_runs`: a small real training run logged to each server, a run without `model/model.pt`,
  a registered model `digits` (version 1, alias `champion`) and a run with a large extra artifact.

Every process runs on 127.0.0.1 and is stopped by PID at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from digitflow.artifacts.tracking import TrackingTarget
from digitflow.training.config import load_train_config
from digitflow.training.run import run_training
from tests.support.mlflow_server import basic_auth_env, launch_mlflow_server
from tests.support.processes import ServerProcess, stop_process, wait_for_http
from tests.support.seaweedfs import S3Server, launch_seaweedfs, wait_until_writable

BUCKET = "mlflow"
ADMIN = "admin"
ADMIN_PASSWORD = "digitflow-admin-pw-1"
TINY_TRAINING = ["epochs=1", "train_limit=300", "golden_count=10", "test_bs=500"]
BIG_ARTIFACT_MB = 48
OUTSIDER = "outsider"
OUTSIDER_PASSWORD = "outsider-pw-1"


@dataclass
class MlflowStack:
    s3: S3Server
    proxy: ServerProcess
    plain: ServerProcess
    auth: ServerProcess


@dataclass
class StackRuns:
    proxy_run: str
    plain_run: str
    auth_run: str
    no_model_run: str
    big_run: str
    big_artifact_size: int


def stop_all(servers: list[ServerProcess], timeout: float = 5.0) -> None:
    """SIGTERM every server's process group at once, then SIGKILL what lingers (by PID)."""
    for server in servers:
        if server.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for server in servers:
        try:
            server.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stop_process(server, timeout=0.1)


@pytest.fixture(scope="session")
def mlflow_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowStack]:
    """SeaweedFS and three MLflow servers over it: proxy, plain s3:// root, proxy + basic auth.

    All four processes start at once (the MLflow servers do not touch S3 until asked to).
    """
    root = tmp_path_factory.mktemp("mlflow-stack")
    started: list[ServerProcess] = []
    try:
        s3 = launch_seaweedfs(root / "seaweedfs")
        started.append(s3.server)
        s3_env = s3.env()
        proxy = launch_mlflow_server(
            root / "proxy",
            ["--artifacts-destination", f"s3://{BUCKET}/proxied", "--serve-artifacts"],
            env=s3_env,
        )
        started.append(proxy)
        plain = launch_mlflow_server(
            root / "plain",
            ["--default-artifact-root", f"s3://{BUCKET}/plain", "--no-serve-artifacts"],
            env=s3_env,
        )
        started.append(plain)
        auth = launch_mlflow_server(
            root / "auth",
            [
                "--artifacts-destination",
                f"s3://{BUCKET}/auth",
                "--serve-artifacts",
                "--app-name",
                "basic-auth",
            ],
            env={**s3_env, **basic_auth_env(root / "auth", ADMIN, ADMIN_PASSWORD)},
        )
        started.append(auth)
        wait_until_writable(s3, 120)
        s3.create_bucket(BUCKET)
        for server in started[1:]:
            wait_for_http(server, "/health", 180)
        yield MlflowStack(s3=s3, proxy=proxy, plain=plain, auth=auth)
    finally:
        stop_all(started)


def _train(data_dir: Path, uri: str, name: str) -> str:
    config = load_train_config(None, [*TINY_TRAINING, f"mlflow_run_name={name}"])
    return run_training(config, data_dir, TrackingTarget(uri=uri), progress=False).run_id


@pytest.fixture(scope="session")
def stack_runs(
    mlflow_stack: MlflowStack, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> StackRuns:
    """Real training runs on each server, plus the odd runs the error tests need."""
    s3 = mlflow_stack.s3
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k.startswith(("MLFLOW_", "AWS_"))]:
            patch.delenv(key)
        proxy_run = _train(data_dir, mlflow_stack.proxy.url, "proxy-run")
        for key, value in s3.env().items():
            patch.setenv(key, value)
        plain_run = _train(data_dir, mlflow_stack.plain.url, "plain-run")
        patch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
        patch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        auth_run = _train(data_dir, mlflow_stack.auth.url, "auth-run")
        patch.delenv("MLFLOW_TRACKING_USERNAME")
        patch.delenv("MLFLOW_TRACKING_PASSWORD")
        _add_user_without_access(mlflow_stack.auth.url, auth_run)

        client = MlflowClient(tracking_uri=mlflow_stack.proxy.url)
        experiment_id = client.get_run(proxy_run).info.experiment_id
        no_model = client.create_run(experiment_id, run_name="no-model").info.run_id
        client.log_dict(no_model, {"epochs": 1}, "train_model_config.json")
        client.set_terminated(no_model)

        client.create_registered_model("digits")
        client.create_model_version("digits", source=f"runs:/{proxy_run}/model", run_id=proxy_run)
        client.set_registered_model_alias("digits", "champion", "1")

        blob_dir = tmp_path_factory.mktemp("big-artifact") / "extra"
        blob_dir.mkdir()
        (blob_dir / "blob.bin").write_bytes(os.urandom(BIG_ARTIFACT_MB << 20))
        big_run = client.create_run(experiment_id, run_name="big").info.run_id
        proxy_artifacts = client.list_artifacts(proxy_run, "model")
        assert any(a.path == "model/model.pt" for a in proxy_artifacts)
        local_model = Path(client.download_artifacts(proxy_run, "model", str(blob_dir.parent)))
        client.log_artifacts(big_run, str(local_model), "model")
        client.log_artifacts(big_run, str(blob_dir), "extra")
        client.set_terminated(big_run)
    return StackRuns(
        proxy_run=proxy_run,
        plain_run=plain_run,
        auth_run=auth_run,
        no_model_run=no_model,
        big_run=big_run,
        big_artifact_size=BIG_ARTIFACT_MB << 20,
    )


def _add_user_without_access(url: str, run_id: str) -> None:
    """Create `OUTSIDER` through the auth REST API with a DENY grant on the run's experiment."""
    admin = (ADMIN, ADMIN_PASSWORD)
    created = requests.post(
        f"{url}/api/2.0/mlflow/users/create",
        json={"username": OUTSIDER, "password": OUTSIDER_PASSWORD},
        auth=admin,
        timeout=10,
    )
    assert created.status_code == 200, created.text
    run = requests.get(
        f"{url}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, auth=admin, timeout=10
    )
    experiment_id = run.json()["run"]["info"]["experiment_id"]
    denied = requests.post(
        f"{url}/api/3.0/mlflow/users/permissions/grant",
        json={
            "username": OUTSIDER,
            "resource_type": "experiment",
            "resource_id": experiment_id,
            "permission": "DENY",
        },
        auth=admin,
        timeout=10,
    )
    assert denied.status_code == 200, denied.text


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections but never answers (requests must time out)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield int(sock.getsockname()[1])
