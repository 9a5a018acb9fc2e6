"""`digitflow serve --engine ray`: the seed API through Ray Serve's HTTP proxy, on a real local
single-node Ray cluster (2 CPUs, no dashboard, a small object store, its own temp folder)."""

from __future__ import annotations

import contextlib
import csv
import importlib
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from digitflow import paths
from digitflow.artifacts.refs import ModelPin, pin_served_model
from digitflow.errors import ModelNotFound
from digitflow.inference.classifier import Classifier
from digitflow.inference.preprocess import bytes_to_input
from digitflow.settings import StoreConfig
from digitflow_fastapi.config import get_settings
from digitflow_fastapi.scale.ray_serve import replica_model, replica_settings
from tests.support.artifact_stores import MlflowStack, StackRuns
from tests.support.gunicorn_server import TrainedModel
from tests.support.processes import ServerProcess, free_port, free_port_block, start_process

PREDICT = "/api/v1/model/predict"
DIGITFLOW = str(Path(sys.executable).parent / "digitflow")
REPLICA_TITLE = b"ray::ServeReplica:digitflow:DigitflowAPI"
SERVE_CONFIG = paths.PROJECT_ROOT / "deploy" / "ray" / "serve_config.yaml"


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (Ray's GCS, raylet, its workers and their children)."""
    found: list[int] = []
    frontier = {pid}
    while frontier:
        children = [
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and _parent(int(p.name)) in frontier
        ]
        found.extend(children)
        frontier = set(children)
    return found


def replica_pids(server: ServerProcess) -> set[int]:
    """PIDs of the Serve replicas of this server's cluster, found by their process title."""
    pids = set()
    for pid in descendants(server.pid):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(REPLICA_TITLE):
                pids.add(pid)
    return pids


def wait_until_ready(server: ServerProcess, timeout: float = 300) -> None:
    """Poll /ready until a replica answers 200 (Ray's proxy answers 404 before the app is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"ray engine exited:\n{server.log()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/ready", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"ray engine not ready in {timeout} s:\n{server.log()[-4000:]}")


def stop_ray_engine(server: ServerProcess, cluster: list[int]) -> None:
    """SIGTERM the engine by PID (it shuts Serve and its local cluster down), then SIGKILL
    whatever of its cluster's processes is left."""
    if server.alive():
        os.kill(server.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=90)
        except Exception:
            os.kill(server.pid, signal.SIGKILL)
            server.process.wait(timeout=10)
    for pid in [*cluster, *descendants(server.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_server(
    trained_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """`digitflow serve --engine ray --replicas 2` on 127.0.0.1, stopped by PID afterwards."""
    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="dfray-")  # short: Ray's socket paths live under it
    log = tmp_path_factory.mktemp("ray-serve") / "serve.log"
    env = {
        "PRED_MODEL_PATH": str(trained_model.model_path),
        "PRED_MODEL_UUID": trained_model.run_id,
        "RAY_TMPDIR": ray_tmp,
        "RAY_ADDRESS": "",
    }
    command = [DIGITFLOW, "serve", "--engine", "ray", "--replicas", "2"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    server = start_process(command, log, f"http://127.0.0.1:{port}", env=env)
    cluster: list[int] = []
    try:
        wait_until_ready(server)
        cluster = descendants(server.pid)
        yield server
    finally:
        stop_ray_engine(server, cluster)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def client(ray_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ray_server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def held_out(data_dir: Path) -> list[tuple[Path, int]]:
    """200 test-split images (never trained on), spread over all ten digits."""
    with (data_dir / "test.csv").open() as f:
        rows = [(data_dir / r["filepath"], int(r["label"])) for r in csv.DictReader(f)]
    return rows[:: max(1, len(rows) // 200)][:200]


def upload(path: Path, name: str | None = None) -> dict[str, tuple[str, bytes, str]]:
    return {"image_file": (name or path.name, path.read_bytes(), "image/png")}


@pytest.mark.slow
def test_ray_engine_answers_200_held_out_images_exactly_as_the_model_does(
    client: httpx.Client, held_out: list[tuple[Path, int]], trained_model: TrainedModel
) -> None:
    model = Classifier.from_checkpoint(trained_model.model_path, backend="onnx")
    expected = model.predict(np.stack([bytes_to_input(p.read_bytes()) for p, _ in held_out]))
    answers = []
    for i, (path, _) in enumerate(held_out):
        r = client.post(PREDICT, files=upload(path, f"{i}.png"))
        assert r.status_code == 200, r.text
        assert r.json() == {
            "data": [
                {"image_filename": f"{i}.png", "prediction": r.json()["data"][0]["prediction"]}
            ]
        }
        answers.append(r.json()["data"][0]["prediction"])
    assert answers == [str(p.label) for p in expected]
    accuracy = np.mean([a == str(label) for a, (_, label) in zip(answers, held_out, strict=True)])
    assert accuracy > 0.9


@pytest.mark.slow
def test_ray_engine_answers_several_files_in_one_request_in_order(
    client: httpx.Client, held_out: list[tuple[Path, int]]
) -> None:
    files = [
        ("image_file", (f"{i}.png", p.read_bytes(), "image/png"))
        for i, (p, _) in enumerate(held_out[:8])
    ]
    r = client.post(PREDICT, files=files)
    assert r.status_code == 200
    assert [d["image_filename"] for d in r.json()["data"]] == [f"{i}.png" for i in range(8)]


@pytest.mark.slow
def test_ray_engine_reports_the_served_run_uuid(
    client: httpx.Client, trained_model: TrainedModel
) -> None:
    r = client.get("/api/v1/model/version")
    assert r.status_code == 200
    assert r.json() == {"data": {"model_uuid": trained_model.run_id}}


@pytest.mark.slow
def test_ray_engine_rejects_a_text_file_with_the_same_415_json(client: httpx.Client) -> None:
    r = client.post(PREDICT, files={"image_file": ("notes.txt", b"hello", "text/plain")})
    assert r.status_code == 415
    assert "not a supported image" in r.json()["detail"]


@pytest.mark.slow
def test_ray_engine_rejects_a_body_without_image_file_with_a_4xx_json(
    client: httpx.Client,
) -> None:
    r = client.post(PREDICT, files={"other": ("a.png", b"x", "image/png")})
    assert r.status_code == 422
    assert "image_file" in r.json()["detail"]


def test_pinning_a_checkpoint_path_keeps_the_path_and_the_given_uuid(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    pin = pin_served_model(checkpoint, None, "abc", StoreConfig())
    assert pin == ModelPin(str(checkpoint), None, "abc")


def test_pinning_a_missing_checkpoint_fails_before_ray_starts(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound):
        pin_served_model(tmp_path / "gone.pt", None, None, StoreConfig())


@dataclass
class Traffic:
    """Requests sent one after another from a thread, with each outcome and when it came."""

    sample: Path
    url: str
    outcomes: list[tuple[float, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self.stop.is_set():
                try:
                    status = c.post(PREDICT, files=upload(self.sample)).status_code
                except httpx.HTTPError:
                    status = 0
                self.outcomes.append((time.monotonic(), status))


@pytest.mark.slow
def test_a_killed_replica_is_replaced_and_requests_keep_being_answered(
    ray_server: ServerProcess, client: httpx.Client, held_out: list[tuple[Path, int]]
) -> None:
    before = replica_pids(ray_server)
    assert len(before) == 2
    traffic = Traffic(held_out[0][0], ray_server.url)
    sender = threading.Thread(target=traffic.run, daemon=True)
    sender.start()
    victim = min(before)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    deadline = killed_at + 240
    while time.monotonic() < deadline:
        now = replica_pids(ray_server)
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"replica {victim} was not replaced: {replica_pids(ray_server)}")
    wait_until_ready(ray_server)
    traffic.stop.set()
    sender.join(timeout=60)
    after_kill = [status for at, status in traffic.outcomes if at > killed_at]
    assert after_kill.count(200) > 0, after_kill
    assert 0 not in after_kill  # every request got an HTTP answer
    for path, _ in held_out[:20]:  # and the cluster, new replica included, answers them all
        assert client.post(PREDICT, files=upload(path)).status_code == 200
    assert replica_pids(ray_server) - before


def test_the_serve_deploy_config_is_valid_and_names_this_app_and_deployment() -> None:
    from ray.serve.schema import ServeDeploySchema

    from digitflow_fastapi.scale import ray_serve

    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    (app,) = config.applications
    module, _, attribute = app.import_path.partition(":")
    assert getattr(importlib.import_module(module), attribute) is ray_serve.build_app
    assert ray_serve.AppArgs.model_validate(app.args).model_uri
    assert [d.name for d in app.deployments] == [ray_serve.DEPLOYMENT_NAME]
    assert config.http_options.port == 8080


def test_the_serve_deploy_config_carries_no_credentials() -> None:
    env_vars = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["runtime_env"]
    names = set(env_vars["env_vars"])
    assert not names & {"MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"}


@dataclass(frozen=True)
class RayHead:
    address: str
    auth_env: dict[str, str]


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[RayHead]:
    """A separate single-node Ray head (`ray start --head --block`) on free ports and its own
    temp folder, with its own auth token; stopped by PID afterwards."""
    ports = free_port_block(8 + 51)  # 8 listeners + min-worker-port, then the worker range
    ray_tmp = tempfile.mkdtemp(prefix="dfhead-")
    token = tmp_path / "ray_token"
    token.write_text(secrets.token_hex(32))
    auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block"]
    command += ["--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"]
    command += ["--object-store-memory=200000000", f"--temp-dir={ray_tmp}"]
    names = ["port", "node-manager-port", "object-manager-port", "ray-client-server-port"]
    names += ["dashboard-agent-listen-port", "dashboard-agent-grpc-port"]
    names += ["runtime-env-agent-port", "metrics-export-port", "min-worker-port"]
    command += [f"--{name}={port}" for name, port in zip(names, ports[:9], strict=True)]
    command += [f"--max-worker-port={ports[-1]}"]
    head = start_process(command, tmp_path / "head.log", "", env=auth_env)
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in head.log():
            assert head.alive() and time.monotonic() < deadline, head.log()[-3000:]
            time.sleep(0.5)
        yield RayHead(f"127.0.0.1:{ports[0]}", auth_env)
    finally:
        stop_ray_engine(head, descendants(head.pid))
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_joining_a_running_cluster_serves_there_and_removes_only_its_app_on_exit(
    ray_head: RayHead, trained_model: TrainedModel, tmp_path: Path, held_out: list[tuple[Path, int]]
) -> None:
    port = free_port()
    env = {
        "PRED_MODEL_PATH": str(trained_model.model_path),
        "PRED_MODEL_UUID": trained_model.run_id,
        "RAY_ADDRESS": ray_head.address,
        **ray_head.auth_env,
    }
    command = [DIGITFLOW, "serve", "--engine", "ray", "--replicas", "1"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    engine = start_process(command, tmp_path / "engine.log", f"http://127.0.0.1:{port}", env=env)
    try:
        wait_until_ready(engine)
        assert replica_pids(engine) == set()  # the replica runs under the head, not this command
        r = httpx.post(engine.url + PREDICT, files=upload(held_out[0][0]), timeout=60)
        assert r.status_code == 200
        assert r.json()["data"][0]["prediction"] in "0123456789"
    finally:
        os.kill(engine.pid, signal.SIGTERM)
        assert engine.process.wait(timeout=120) == 0, engine.log()[-3000:]
    # The cluster's proxy stays up, without the app: the route is gone.
    assert httpx.get(engine.url + "/api/v1/model/version", timeout=30).status_code == 404


@pytest.mark.slow
def test_a_registry_alias_is_pinned_to_its_run_once_and_each_replica_pulls_that_run(
    mlflow_stack: MlflowStack,
    stack_runs: StackRuns,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = StoreConfig(tracking_uri=mlflow_stack.proxy.url, timeout=5.0)
    pin = pin_served_model(None, "models:/digits@champion", None, store)
    run_id = stack_runs.proxy_run
    assert pin == ModelPin(None, f"runs:/{run_id}/model", run_id)
    assert not (tmp_path / "driver").exists()  # pinned, not pulled, where the app is built

    for key in [k for k in os.environ if k.startswith(("MLFLOW_", "AWS_", "PRED_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_stack.proxy.url)
    monkeypatch.setenv("PRED_MODELS_DIR", str(tmp_path / "node"))
    get_settings.cache_clear()
    try:
        settings = replica_settings(threads=1)
        served = replica_model(pin)
    finally:
        get_settings.cache_clear()
    assert run_id == served.model_uuid
    expected = tmp_path / "node" / run_id / "artifacts" / "model" / "model.pt"
    assert served.model_path.resolve() == expected.resolve()
    assert served.model_path.is_file()
    assert (settings.TORCH_THREADS, settings.WEB_CONCURRENCY) == (1, 1)
