"""The container images, built with `make image` (slim: no torch, no full MLflow) and `make
image-full` on a local Debian stand-in for python:3.11-slim, and run the way the seed and the
Kubernetes manifests run them (host network, 127.0.0.1 only). Most tests run the slim image."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from digitflow.artifacts.run_layout import MLMODEL_FILENAME, ONNX_FILENAME
from digitflow.data.mnist import read_annotations
from digitflow.inference.classifier import Classifier
from digitflow.inference.preprocess import bytes_to_input
from tests.support.docker_images import (
    IMAGE_FULL_TAG,
    IMAGE_TAG,
    REPO_ROOT,
    RESTRICTED,
    Container,
    container,
    docker_daemon,
    ensure_base_image,
    image_size,
    inspect,
    run,
)
from tests.support.gunicorn_server import TrainedModel
from tests.support.mlflow_server import start_mlflow_server
from tests.support.processes import free_port, stop_process

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("docker") is None, reason="needs docker (see .ci/run)"),
]

APP_UID = 10001
SLIM_SIZE_LIMIT = 800 * 1000**2  # bytes, in the units `docker images` reports


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """`make image` (slim) on the debootstrapped base (cached by tag), with a daemon for the
    module."""
    from tests.support.docker_images import build_image

    with docker_daemon():
        yield build_image(IMAGE_TAG, ensure_base_image())


@pytest.fixture(scope="module")
def full_image(image: str) -> str:
    """`make image-full` once for the module, while the slim image's daemon runs."""
    from tests.support.docker_images import build_image_full

    return build_image_full(IMAGE_FULL_TAG, ensure_base_image())


@dataclass(frozen=True)
class MountedModels:
    """A host `models/` folder laid out like a pulled run, readable by the container's user."""

    host_dir: Path
    run_id: str

    @property
    def container_model_path(self) -> str:
        return f"/models/{self.run_id}/artifacts/model/model.pt"


@pytest.fixture(scope="module")
def models(trained_model: TrainedModel) -> Iterator[MountedModels]:
    """`models/<uuid>/artifacts/...` in a world-readable temporary folder (pytest's are 0700)."""
    host_dir = Path(tempfile.mkdtemp(prefix="digitflow-container-models-"))
    artifacts = trained_model.model_path.parent.parent
    shutil.copytree(artifacts, host_dir / trained_model.run_id / "artifacts")
    for path in [host_dir, *host_dir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    try:
        yield MountedModels(host_dir, trained_model.run_id)
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


def predict_env(models: MountedModels, port: int) -> dict[str, str]:
    return {
        "PRED_MODEL_UUID": models.run_id,
        "PRED_MODEL_PATH": models.container_model_path,
        "PORT": str(port),
        "WEB_CONCURRENCY": "2",
        "REQUEST_LOG": "true",
    }


def wait_until_ready(box: Container, url: str, timeout: float = 240) -> None:
    """Poll /ready until 200; fail with the container's logs if it exits or never gets there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not box.running():
            pytest.fail(f"container exited {box.state()['ExitCode']}:\n{box.logs()}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"container not ready after {timeout} s:\n{box.logs()}")


@contextlib.contextmanager
def serving(image: str, models: MountedModels) -> Iterator[tuple[Container, str]]:
    """The seed's `docker run`, model on a read-only volume, restricted like the Kubernetes pod."""
    port = free_port()
    options = ["-v", f"{models.host_dir}:/models:ro", *RESTRICTED]
    started = time.monotonic()
    with container(image, env=predict_env(models, port), options=options) as box:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(box, url)
        print(f"{image}: docker run -> /ready in {time.monotonic() - started:.1f} s")
        yield box, url


def refusal_line(box: Container) -> str:
    """The one line a container that refuses to start prints; it must exit non-zero."""
    exit_code = box.wait()
    logs = box.logs()
    assert exit_code != 0, logs
    lines = logs.strip().splitlines()
    assert len(lines) == 1, logs
    return lines[0]


@pytest.fixture(scope="module")
def served(image: str, models: MountedModels) -> Iterator[tuple[Container, str]]:
    """The slim image serving the trained run (its model.onnx, vouched for by MLmodel)."""
    with serving(image, models) as box_and_url:
        yield box_and_url


@pytest.fixture(scope="module")
def served_full(full_image: str, models: MountedModels) -> Iterator[tuple[Container, str]]:
    """The full image serving the same run, the same way."""
    with serving(full_image, models) as box_and_url:
        yield box_and_url


@pytest.fixture(scope="module")
def bare_models(models: MountedModels) -> Iterator[MountedModels]:
    """The mounted run without model.onnx and MLmodel: a bare model.pt, as if trained elsewhere."""
    host_dir = Path(tempfile.mkdtemp(prefix="digitflow-container-bare-"))
    host_dir.chmod(0o755)
    shutil.copytree(
        models.host_dir / models.run_id,
        host_dir / models.run_id,
        ignore=shutil.ignore_patterns(ONNX_FILENAME, MLMODEL_FILENAME),
    )
    try:
        yield MountedModels(host_dir, models.run_id)
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


def curl_predict(url: str, image_path: Path) -> object:
    """The seed's curl command (httpx when the host has no curl); the parsed JSON answer."""
    curl = shutil.which("curl")
    if curl is None:
        with image_path.open("rb") as handle:
            return httpx.post(f"{url}/api/v1/model/predict", files={"image_file": handle}).json()
    output = run(
        [
            curl,
            "-sS",
            "-X",
            "POST",
            f"{url}/api/v1/model/predict",
            "-H",
            "Content-Type: multipart/form-data",
            "-F",
            f"image_file=@{image_path}",
        ]
    )
    return json.loads(output)


def test_the_documented_curl_answers_the_right_digits_with_the_model_on_a_read_only_volume(
    served: tuple[Container, str], data_dir: Path, trained_model: TrainedModel
) -> None:
    _, url = served
    rows = read_annotations(data_dir, "test")[:20]
    local = Classifier.from_checkpoint(trained_model.model_path, backend="torch")
    correct = 0
    for relative, label in rows:
        image_path = data_dir / relative
        expected = local.predict(bytes_to_input(image_path.read_bytes())[None])[0].label
        answer = curl_predict(url, image_path)
        assert answer == {
            "data": [{"image_filename": image_path.name, "prediction": str(expected)}]
        }
        correct += expected == label
    assert correct >= 18  # the digits are right, not merely the same as on the host


def test_the_slim_image_is_at_most_800_mb(image: str, full_image: str) -> None:
    slim, full = image_size(image), image_size(full_image)
    print(f"image sizes: slim {slim / 1e6:.0f} MB, full {full / 1e6:.0f} MB")
    assert slim <= SLIM_SIZE_LIMIT
    assert slim < full


def test_the_slim_image_has_no_torch_and_the_full_one_has(image: str, full_image: str) -> None:
    probe = ["--entrypoint", "python", "-c", "import torch"]
    slim = subprocess.run(
        ["docker", "run", "--rm", *probe[:2], image, *probe[2:]],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert slim.returncode != 0
    assert "ModuleNotFoundError" in slim.stderr, slim.stderr
    run(["docker", "run", "--rm", *probe[:2], full_image, *probe[2:]], timeout=120)


def test_the_slim_and_the_full_image_answer_the_documented_curl_alike_on_100_pngs(
    served: tuple[Container, str],
    served_full: tuple[Container, str],
    data_dir: Path,
    models: MountedModels,
) -> None:
    assert (models.host_dir / models.container_model_path.removeprefix("/models/")).is_file()
    (_, slim_url), (_, full_url) = served, served_full
    rows = read_annotations(data_dir, "test")[:100]
    differing = []
    for relative, _ in rows:
        image_path = data_dir / relative
        slim, full = curl_predict(slim_url, image_path), curl_predict(full_url, image_path)
        assert isinstance(slim, dict) and slim["data"][0]["image_filename"] == image_path.name
        if slim != full:
            differing.append((image_path.name, slim, full))
    assert len(rows) == 100
    assert differing == []


def test_the_slim_image_given_a_checkpoint_without_its_graph_exits_with_one_line(
    image: str, bare_models: MountedModels
) -> None:
    options = ["-v", f"{bare_models.host_dir}:/models:ro", *RESTRICTED]
    env = predict_env(bare_models, free_port())
    with container(image, env=env, options=options) as box:
        line = refusal_line(box)
    assert "digitflow export" in line and "image-full" in line


def test_the_full_image_serves_a_checkpoint_without_its_graph(
    full_image: str, bare_models: MountedModels, data_dir: Path
) -> None:
    image_path = data_dir / read_annotations(data_dir, "test")[0][0]
    with serving(full_image, bare_models) as (_, url):
        answer = curl_predict(url, image_path)
    assert isinstance(answer, dict) and answer["data"][0]["prediction"] in "0123456789"


def test_the_version_route_reports_the_configured_run_uuid(
    served: tuple[Container, str], models: MountedModels
) -> None:
    _, url = served
    response = httpx.get(f"{url}/api/v1/model/version")
    assert response.json() == {"data": {"model_uuid": models.run_id}}


def test_the_container_runs_as_a_non_root_user(served: tuple[Container, str]) -> None:
    box, _ = served
    assert run(["docker", "exec", box.id, "id", "-u"]).strip() == str(APP_UID)


def test_the_container_logs_json_lines_to_stderr(served: tuple[Container, str]) -> None:
    box, _ = served
    stderr = subprocess.run(
        ["docker", "logs", box.id], capture_output=True, text=True, check=True
    ).stderr
    json_lines = [line for line in stderr.splitlines() if line.startswith("{")]
    assert json_lines, stderr
    assert all(json.loads(line) for line in json_lines)


def test_the_container_s_request_lines_carry_the_request_id(
    served: tuple[Container, str], data_dir: Path
) -> None:
    box, url = served
    request_id = f"container-{uuid.uuid4().hex}"
    image_path = data_dir / read_annotations(data_dir, "test")[0][0]
    with image_path.open("rb") as handle:
        reply = httpx.post(
            f"{url}/api/v1/model/predict",
            files={"image_file": handle},
            headers={"X-Request-ID": request_id},
        )
    assert reply.headers["x-request-id"] == request_id
    deadline = time.monotonic() + 10
    stamped: list[dict[str, object]] = []
    while not stamped and time.monotonic() < deadline:
        lines = [line for line in box.logs().splitlines() if line.startswith("{")]
        stamped = [
            entry for entry in map(json.loads, lines) if entry.get("request_id") == request_id
        ]
        time.sleep(0.2)
    assert stamped, box.logs()[-3000:]
    (access,) = [entry for entry in stamped if entry["logger"] == "digitflow_fastapi.access"]
    assert access["path"] == "/api/v1/model/predict"


def test_the_image_carries_oci_labels_and_a_healthcheck_on_health(
    image: str, served: tuple[Container, str]
) -> None:
    config = inspect(image)["Config"]
    assert isinstance(config, dict)
    labels = config["Labels"]
    revision = run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"]).strip()
    assert labels["org.opencontainers.image.revision"] == revision
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    assert "/health" in " ".join(config["Healthcheck"]["Test"])
    assert config["ExposedPorts"] == {"8080/tcp": {}}
    box, _ = served
    deadline = time.monotonic() + 120
    while box.state()["Health"]["Status"] != "healthy" and time.monotonic() < deadline:  # type: ignore[index]
        time.sleep(1)
    assert box.state()["Health"]["Status"] == "healthy"  # type: ignore[index]


@dataclass
class Tally:
    """What a stream of requests saw while the server stopped."""

    answered: int = 0
    refused: int = 0  # never connected: the listening socket was already closed
    # sent, but no (correct) answer came back: (monotonic time the request was sent, what came)
    lost: list[tuple[float, str]] = field(default_factory=list)


def stream_requests(url: str, image_path: Path, stop: threading.Event, tally: Tally) -> None:
    """POST the image until told to stop, one connection per request.

    An idle keep-alive connection that the server closes at shutdown can race a request the
    client is just sending on it (a reset the client must retry); that is HTTP/1.1, not a request
    the server dropped, so each request here gets its own connection.
    """
    payload = image_path.read_bytes()
    with httpx.Client(timeout=30, headers={"Connection": "close"}) as client:
        while not stop.is_set():
            sent_at = time.monotonic()
            try:
                response = client.post(
                    f"{url}/api/v1/model/predict",
                    files={"image_file": (image_path.name, payload, "image/png")},
                )
            except httpx.ConnectError:
                tally.refused += 1
                time.sleep(0.05)
                continue
            except httpx.HTTPError as exc:
                tally.lost.append((sent_at, repr(exc)))
                continue
            if response.status_code == 200:
                tally.answered += 1
            else:
                tally.lost.append((sent_at, f"{response.status_code} {response.text[:200]}"))


@dataclass(frozen=True)
class StoppedUnderLoad:
    """`docker stop` of a serving container while four clients stream requests at it."""

    exit_code: int
    tallies: list[Tally]
    logs: str
    stopped_at: float  # monotonic time just before `docker stop` was run

    @property
    def lost(self) -> list[str]:
        """Requests sent before the stop that got no answer (the issue's criterion: a request
        sent while the server is already stopping may be refused or reset)."""
        return [
            what for tally in self.tallies for sent, what in tally.lost if sent < self.stopped_at
        ]


@pytest.fixture(scope="module")
def stopped_under_load(image: str, models: MountedModels, data_dir: Path) -> StoppedUnderLoad:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    image_path = data_dir / read_annotations(data_dir, "test")[0][0]
    options = ["-v", f"{models.host_dir}:/models:ro"]
    with container(image, env=predict_env(models, port), options=options) as box:
        wait_until_ready(box, url)
        stop, tallies = threading.Event(), [Tally() for _ in range(4)]
        threads = [
            threading.Thread(target=stream_requests, args=(url, image_path, stop, tally))
            for tally in tallies
        ]
        for thread in threads:
            thread.start()
        try:
            while sum(t.answered for t in tallies) < 200:
                time.sleep(0.05)
            stopped_at = time.monotonic()
            run(["docker", "stop", "--time", "10", box.id], timeout=60)
            exit_code = box.wait()
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        return StoppedUnderLoad(exit_code, tallies, box.logs(), stopped_at)


def test_docker_stop_under_a_stream_of_requests_exits_zero_inside_the_grace_period(
    stopped_under_load: StoppedUnderLoad,
) -> None:
    result = stopped_under_load
    # 137 would mean SIGKILL: the server did not finish within `docker stop`'s 10 s.
    assert result.exit_code == 0, result.logs[-3000:]
    assert "Shutting down: Master" in result.logs
    assert sum(t.answered for t in result.tallies) >= 200


def test_docker_stop_under_a_stream_of_requests_loses_none(
    stopped_under_load: StoppedUnderLoad,
) -> None:
    lost = stopped_under_load.lost
    assert lost == [], f"{len(lost)} requests lost: {lost[:5]}"


def test_a_container_without_a_model_exits_non_zero_with_one_clear_line(image: str) -> None:
    with container(image) as box:
        line = refusal_line(box)
    assert "no model configured" in line and "PRED_MODEL_PATH" in line


def test_a_missing_checkpoint_exits_non_zero_with_one_clear_line(
    image: str, models: MountedModels
) -> None:
    missing = f"/models/{models.run_id}/artifacts/model/absent.pt"
    options = ["-v", f"{models.host_dir}:/models:ro"]
    with container(image, env={"PRED_MODEL_PATH": missing}, options=options) as box:
        line = refusal_line(box)
    assert missing in line


@dataclass(frozen=True)
class TrackedRun:
    """A run logged to a real `mlflow server` that proxies its artifacts over HTTP."""

    tracking_uri: str
    run_id: str


@pytest.fixture(scope="module")
def tracked_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackedRun]:
    """An artifact-proxying mlflow server (so a container needs only HTTP) with a tiny run."""
    from digitflow.artifacts.tracking import TrackingTarget
    from digitflow.training.config import load_train_config
    from digitflow.training.run import run_training

    workdir = tmp_path_factory.mktemp("container-mlflow")
    args = ["--serve-artifacts", "--artifacts-destination", str(workdir / "artifacts")]
    server = start_mlflow_server(workdir, args)
    try:
        config = load_train_config(None, ["epochs=1", "train_limit=300", "golden_count=10"])
        run_id = run_training(config, data_dir, TrackingTarget(uri=server.url), progress=False)
        yield TrackedRun(server.url, run_id.run_id)
    finally:
        stop_process(server)


@pytest.fixture
def writable_models_dir() -> Iterator[Path]:
    """An empty host folder the container's user owns (the Kubernetes emptyDir's stand-in)."""
    folder = Path(tempfile.mkdtemp(prefix="digitflow-container-pull-"))
    os.chown(folder, APP_UID, APP_UID)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_kubernetes_pod_flow_pulls_then_serves_the_run_without_credentials(
    image: str, tracked_run: TrackedRun, writable_models_dir: Path
) -> None:
    uri = f"runs:/{tracked_run.run_id}/model"
    volume = f"{writable_models_dir}:/models"
    # The init container: `digitflow pull` into the empty volume, restricted like the pod.
    pull = [
        "docker",
        "run",
        "--rm",
        "--network",
        "host",
        "-e",
        f"MLFLOW_TRACKING_URI={tracked_run.tracking_uri}",
        "-v",
        volume,
        *RESTRICTED,
        "--entrypoint",
        "digitflow",
        image,
        "pull",
        uri,
        "--dest",
        "/models",
        "--no-progress",
    ]
    exports = run(pull)
    assert f"PRED_MODEL_UUID={tracked_run.run_id}" in exports
    # The serving container: the same run URI, the volume read-only, no tracking server at all.
    port = free_port()
    env = {"PRED_MODEL_URI": uri, "PRED_MODELS_DIR": "/models", "PORT": str(port)}
    options = ["-v", f"{volume}:ro", *RESTRICTED]
    with container(image, env=env, options=options) as box:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(box, url)
        version = httpx.get(f"{url}/api/v1/model/version").json()
    assert version == {"data": {"model_uuid": tracked_run.run_id}}


def test_a_container_given_a_run_uri_pulls_it_at_start_and_serves_it(
    image: str, tracked_run: TrackedRun, data_dir: Path
) -> None:
    port = free_port()
    env = {
        "PRED_MODEL_URI": f"runs:/{tracked_run.run_id}/model",
        "MLFLOW_TRACKING_URI": tracked_run.tracking_uri,
        "PORT": str(port),
    }
    with container(image, env=env) as box:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(box, url)
        image_path = data_dir / read_annotations(data_dir, "test")[0][0]
        answer = curl_predict(url, image_path)
        version = httpx.get(f"{url}/api/v1/model/version").json()
        pulled = run(["docker", "exec", box.id, "ls", f"/home/app/models/{tracked_run.run_id}"])
    assert version == {"data": {"model_uuid": tracked_run.run_id}}
    assert isinstance(answer, dict) and answer["data"][0]["prediction"] in "0123456789"
    assert "artifacts" in pulled.split()
