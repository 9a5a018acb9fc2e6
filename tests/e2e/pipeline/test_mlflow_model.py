"""A run logged by `digitflow train` is an MLflow Model: MLflow's own tools serve and load it, and
they agree with the seed's route on 100 held-out PNGs (real `mlflow server`, real `mlflow models
serve`, real gunicorn)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
import mlflow
import numpy as np
import pytest

from digitflow.data.mnist import read_annotations
from digitflow.inference.preprocess import bytes_to_input
from tests.support.gunicorn_server import TrainedModel, serve
from tests.support.processes import (
    ServerProcess,
    free_port,
    start_process,
    stop_process,
    wait_for_http,
)

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
DIGITFLOW = str(BIN / "digitflow")
ONNX_TAG = "digitflow.onnx_sha256"


@dataclass(frozen=True)
class LoggedRun:
    tracking_uri: str
    run_id: str
    model_path: Path  # the run's model.pt in the server's local artifact root


@pytest.fixture(scope="module")
def logged_run(mlflow_server: ServerProcess, data_dir: Path) -> LoggedRun:
    """A small run trained against the real `mlflow server`."""
    from digitflow.artifacts.tracking import TrackingTarget
    from digitflow.training.config import load_train_config
    from digitflow.training.run import run_training

    config = load_train_config(None, ["epochs=1", "train_limit=600", "golden_count=10"])
    run = run_training(config, data_dir, TrackingTarget(uri=mlflow_server.url), progress=False)
    folder = Path(unquote(urlparse(run.artifact_uri).path))
    return LoggedRun(mlflow_server.url, run.run_id, folder / "model" / "model.pt")


@pytest.fixture(scope="module")
def held_out(data_dir: Path) -> list[Path]:
    return [data_dir / path for path, _ in read_annotations(data_dir, "test")[:100]]


@pytest.fixture(scope="module")
def batch(held_out: list[Path]) -> np.ndarray:
    """The 100 PNGs as the server feeds the model: [100, 1, 28, 28] float32 in [0, 1]."""
    return np.stack([bytes_to_input(path.read_bytes()) for path in held_out])[:, None]


@pytest.fixture(scope="module")
def seed_route_answers(
    logged_run: LoggedRun, held_out: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> list[int]:
    """What the seed's route (gunicorn, one image per request, as the curl sends) answers."""
    log = tmp_path_factory.mktemp("seed-route") / "gunicorn.log"
    model = TrainedModel(run_id=logged_run.run_id, model_path=logged_run.model_path)
    server_scope = serve(log, model)
    server = next(server_scope)
    try:
        answers = []
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for path in held_out:
                files = {"image_file": (path.name, path.read_bytes(), "image/png")}
                reply = client.post("/api/v1/model/predict", files=files)
                assert reply.status_code == 200, reply.text
                answers.append(int(reply.json()["data"][0]["prediction"]))
        assert "loaded model.onnx logged beside" in log.read_text()
        return answers
    finally:
        server_scope.close()


@pytest.fixture
def tracking(logged_run: LoggedRun) -> Iterator[None]:
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(logged_run.tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def test_the_run_s_model_folder_holds_the_graph_its_mlmodel_and_the_seed_s_files(
    logged_run: LoggedRun,
) -> None:
    client = mlflow.MlflowClient(tracking_uri=logged_run.tracking_uri)
    names = {item.path for item in client.list_artifacts(logged_run.run_id, "model")}
    assert names >= {f"model/{n}" for n in ("MLmodel", "model.onnx", "model.pt", "golden.json")}
    graph = (logged_run.model_path.parent / "model.onnx").read_bytes()
    tag = client.get_run(logged_run.run_id).data.tags[ONNX_TAG]
    assert tag == hashlib.sha256(graph).hexdigest()


def test_mlflow_models_serve_on_the_run_agrees_with_the_seed_route(
    logged_run: LoggedRun,
    batch: np.ndarray,
    seed_route_answers: list[int],
    tmp_path: Path,
) -> None:
    port = free_port()
    command = [str(BIN / "mlflow"), "models", "serve", "-m", f"runs:/{logged_run.run_id}/model"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    env = {
        "MLFLOW_TRACKING_URI": logged_run.tracking_uri,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # it execs `uvicorn`
    }
    server = start_process(command, tmp_path / "mlflow-serve.log", f"http://127.0.0.1:{port}", env)
    try:
        wait_for_http(server, "/ping", timeout=120)
        reply = httpx.post(f"{server.url}/invocations", json={"inputs": batch.tolist()}, timeout=60)
    finally:
        stop_process(server)
    assert reply.status_code == 200, reply.text
    log_probabilities = np.asarray(reply.json()["predictions"]["log_probabilities"])
    assert log_probabilities.shape == (100, 10)
    assert log_probabilities.argmax(1).tolist() == seed_route_answers


@pytest.mark.usefixtures("tracking")
def test_pyfunc_load_model_on_the_run_and_on_its_registered_alias_agrees_with_the_seed_route(
    logged_run: LoggedRun, batch: np.ndarray, seed_route_answers: list[int]
) -> None:
    uri = f"runs:/{logged_run.run_id}/model"
    by_run = mlflow.pyfunc.load_model(uri).predict(batch)["log_probabilities"]
    assert by_run.argmax(1).tolist() == seed_route_answers
    client = mlflow.MlflowClient()
    name = f"digits-{logged_run.run_id[:8]}"
    client.create_registered_model(name)
    version = client.create_model_version(name, source=uri, run_id=logged_run.run_id)
    client.set_registered_model_alias(name, "champion", version.version)
    by_alias = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(batch)
    assert np.array_equal(by_alias["log_probabilities"], by_run)


@pytest.mark.usefixtures("tracking")
def test_digitflow_export_turns_a_run_with_only_the_checkpoint_into_an_mlflow_model(
    logged_run: LoggedRun,
    batch: np.ndarray,
    seed_route_answers: list[int],
    tmp_path: Path,
    data_dir: Path,
) -> None:
    bare = tmp_path / "model"
    bare.mkdir()
    for name in ("model.pt", "golden.json"):
        shutil.copy(logged_run.model_path.parent / name, bare / name)
    client = mlflow.MlflowClient()
    experiment = client.get_run(logged_run.run_id).info.experiment_id
    run_id = client.create_run(experiment).info.run_id
    client.log_artifacts(run_id, str(bare), "model")
    client.set_terminated(run_id)
    before = {item.path for item in client.list_artifacts(run_id, "model")}
    assert "model/MLmodel" not in before

    result = subprocess.run(
        [
            *(DIGITFLOW, "export", f"runs:/{run_id}/model"),
            *("--tracking-uri", logged_run.tracking_uri, "--data-dir", str(data_dir)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    after = {item.path for item in client.list_artifacts(run_id, "model")}
    assert after >= before | {"model/MLmodel", "model/model.onnx"}
    tags = client.get_run(run_id).data.tags
    assert tags[ONNX_TAG] in result.stdout
    # The int8 graph was judged on the data: logged when kept, absent when refused, said so.
    assert f"model.int8.onnx {tags['digitflow.int8']}" in result.stdout
    assert ("model/model.int8.onnx" in after) == (tags["digitflow.int8"] == "kept")
    loaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(batch)
    assert loaded["log_probabilities"].argmax(1).tolist() == seed_route_answers
