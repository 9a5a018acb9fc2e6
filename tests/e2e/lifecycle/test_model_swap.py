"""Model swaps on a real gunicorn server: SIGHUP, a registry alias followed, refusals, respawns.

Models come from a real `mlflow server` with a model registry (the session's `mlflow_server`):
two small runs trained with different seeds (their probabilities for one image differ), and a
third whose golden file is tampered with in the artifact store, so its self-test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
import pytest

from tests.support.gunicorn_server import (
    GUNICORN,
    SRC_DIR,
    start_gunicorn,
    wait_for_replacement,
    worker_pids,
)
from tests.support.processes import (
    ServerProcess,
    free_port,
    start_process,
    stop_process,
    wait_for_http,
)

pytestmark = pytest.mark.slow  # trains models, starts real servers

PREDICT = "/api/v1/model/predict?probabilities=true"
VERSION = "/api/v1/model/version"


@dataclass(frozen=True)
class RegistryRun:
    run_id: str
    model_path: Path


@dataclass(frozen=True)
class Registry:
    url: str
    good: RegistryRun
    other: RegistryRun
    bad_golden: RegistryRun
    sample: bytes
    expected: dict[str, list[float]]  # run id -> probabilities for `sample`


def _train(url: str, data_dir: Path, seed: int) -> RegistryRun:
    from mlflow.tracking import MlflowClient

    from digitflow.artifacts.tracking import TrackingTarget
    from digitflow.training.config import load_train_config
    from digitflow.training.run import run_training

    overrides = ["epochs=1", "train_limit=400", "golden_count=8", f"seed={seed}"]
    config = load_train_config(None, overrides)
    run_id = run_training(config, data_dir, TrackingTarget(uri=url), progress=False).run_id
    uri = MlflowClient(tracking_uri=url).get_run(run_id).info.artifact_uri
    path = Path(unquote(urlparse(str(uri)).path)) / "model" / "model.pt"
    return RegistryRun(run_id, path)


def _tamper_golden(model_path: Path) -> None:
    golden_file = model_path.parent / "golden.json"
    golden = json.loads(golden_file.read_text())
    first = golden["images"][0]
    first["prediction"] = str((int(first["prediction"]) + 1) % 10)
    golden_file.write_text(json.dumps(golden))


@pytest.fixture(scope="module")
def registry(mlflow_server: ServerProcess, data_dir: Path) -> Registry:
    """Three runs in the real tracking server; a sample the two good ones disagree on."""
    from digitflow.inference.classifier import Classifier
    from digitflow.inference.preprocess import bytes_to_input

    good = _train(mlflow_server.url, data_dir, seed=1)
    other = _train(mlflow_server.url, data_dir, seed=2)
    bad = _train(mlflow_server.url, data_dir, seed=3)
    _tamper_golden(bad.model_path)
    models = {run.run_id: Classifier.from_checkpoint(run.model_path) for run in (good, other)}
    for path in sorted((data_dir / "test").glob("*/*.png"))[:50]:
        data = path.read_bytes()
        probs = {
            run_id: list(model.predict(bytes_to_input(data)[None])[0].probabilities)
            for run_id, model in models.items()
        }
        a, b = probs.values()
        if max(abs(x - y) for x, y in zip(a, b, strict=True)) > 0.05:
            return Registry(mlflow_server.url, good, other, bad, data, probs)
    raise AssertionError("the two runs agree on every sample")


def _register(url: str, name: str, runs: list[RegistryRun]) -> Callable[[int], None]:
    """Register `runs` as versions 1..n of `name`; return a function moving `@champion`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url, registry_uri=url)
    client.create_registered_model(name)
    for run in runs:
        client.create_model_version(name, source=f"runs:/{run.run_id}/model", run_id=run.run_id)

    def move(version: int) -> None:
        client.set_registered_model_alias(name, "champion", str(version))

    move(1)
    return move


def _serve(tmp_path: Path, env: dict[str, str]) -> ServerProcess:
    env = {"PRED_MODELS_DIR": str(tmp_path / "models"), **env}
    server = start_gunicorn(tmp_path / "g.log", env, workers=2)
    try:
        wait_for_http(server, "/ready", timeout=180)
    except BaseException:
        stop_process(server)
        raise
    return server


@pytest.fixture
def alias_server(
    registry: Registry, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[ServerProcess, Callable[[int], None]]]:
    """gunicorn on `models:/<name>@champion` (versions: good, other, bad_golden)."""
    name = f"swap-{request.node.name[:40]}"
    move = _register(registry.url, name, [registry.good, registry.other, registry.bad_golden])
    extra: dict[str, str] = getattr(request, "param", {})
    env = {"MLFLOW_TRACKING_URI": registry.url, "PRED_MODEL_URI": f"models:/{name}@champion"}
    server = _serve(tmp_path, {**env, **extra})
    try:
        yield server, move
    finally:
        stop_process(server)


def served_versions(server: ServerProcess, tries: int = 16) -> set[str]:
    """The uuids answered on fresh connections (SO_REUSEPORT spreads them over the workers)."""
    versions = set()
    for _ in range(tries):
        with httpx.Client(base_url=server.url, timeout=30) as fresh:
            versions.add(fresh.get(VERSION).json()["data"]["model_uuid"])
    return versions


def metric_lines(server: ServerProcess, prefix: str) -> list[str]:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return [line for line in text.splitlines() if line.startswith(prefix)]


def wait_until(check: Callable[[], bool], timeout: float, what: str, server: ServerProcess) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not seen in {timeout} s:\n{server.log()}"
        time.sleep(0.25)


def settled_metric(server: ServerProcess, prefix: str, expected: list[str]) -> list[str]:
    """The metric's lines once they show `expected`, or after 10 s: every worker notices a swap
    or refusal within 0.25 s and publishes its snapshot every second."""
    deadline = time.monotonic() + 10
    while (lines := metric_lines(server, prefix)) != expected and time.monotonic() < deadline:
        time.sleep(0.25)
    return lines


def probabilities(server: ServerProcess, sample: bytes) -> list[float]:
    answer = httpx.post(server.url + PREDICT, files={"image_file": ("d.png", sample)}, timeout=30)
    assert answer.status_code == 200, answer.text
    return list(answer.json()["data"][0]["probabilities"])


def which_model(answer: list[float], expected: dict[str, list[float]]) -> str | None:
    """The run whose output this answer is (within float noise of batching), or None."""
    for run_id, probs in expected.items():
        if answer == pytest.approx(probs, abs=1e-4):
            return run_id
    return None


@dataclass
class SteadyLoad:
    """Client threads posting one image in a loop: keep-alive and new-connection clients."""

    server: ServerProcess
    sample: bytes
    clients: int = 6
    answers: list[list[float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def _loop(self, keep_alive: bool) -> None:
        client = httpx.Client(base_url=self.server.url, timeout=30)
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                reply = client.post(PREDICT, files={"image_file": ("d.png", self.sample)})
                if reply.status_code != 200:
                    self.failures.append(f"{reply.status_code} {reply.text[:200]}")
                else:
                    self.answers.append(list(reply.json()["data"][0]["probabilities"]))
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
            self.latencies.append(time.monotonic() - started)
            if not keep_alive:
                client.close()
                client = httpx.Client(base_url=self.server.url, timeout=30)
        client.close()

    def __enter__(self) -> SteadyLoad:
        self.threads = [
            threading.Thread(target=self._loop, args=(i % 2 == 0,), daemon=True)
            for i in range(self.clients)
        ]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def test_sighup_swaps_the_model_under_load_without_a_failed_or_mixed_answer(
    registry: Registry, alias_server: tuple[ServerProcess, Callable[[int], None]]
) -> None:
    server, move = alias_server
    good, other = registry.good.run_id, registry.other.run_id
    assert served_versions(server) == {good}
    with SteadyLoad(server, registry.sample) as load:
        time.sleep(1.0)
        move(2)
        hup_at = time.monotonic()
        os.kill(server.pid, signal.SIGHUP)
        wait_until(lambda: served_versions(server, 8) == {other}, 120, "the new version", server)
        switched_in = time.monotonic() - hup_at
        time.sleep(1.0)
    latencies = sorted(load.latencies)
    print(
        f"\nswap under load: {len(load.answers)} answers, {len(load.failures)} failures, "
        f"switched {switched_in:.1f} s after SIGHUP, latency p50 "
        f"{latencies[len(latencies) // 2] * 1000:.0f} ms, p99 "
        f"{latencies[int(len(latencies) * 0.99)] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms"
    )
    assert load.failures == []
    origins = [which_model(answer, registry.expected) for answer in load.answers]
    assert None not in origins  # every answer is wholly one model's output
    assert {good, other} <= set(origins)
    assert served_versions(server) == {other}
    info = [f'digitflow_model_info{{model_uuid="{other}"}} 2']
    assert settled_metric(server, "digitflow_model_info", info) == info
    swaps = ["digitflow_model_swaps_total 1"]
    assert settled_metric(server, "digitflow_model_swaps_total", swaps) == swaps
    assert f"model swap (hup): {good} -> {other}" in server.log()


@pytest.fixture
def path_server(registry: Registry, tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    """gunicorn on PRED_MODEL_PATH: a copy of the good run's checkpoint and golden file."""
    folder = tmp_path / "serving"
    folder.mkdir()
    shutil.copy(registry.good.model_path, folder / "model.pt")
    shutil.copy(registry.good.model_path.parent / "golden.json", folder / "golden.json")
    server = _serve(tmp_path, {"PRED_MODEL_PATH": str(folder / "model.pt"), "PRED_MODEL_UUID": "a"})
    try:
        yield server, folder
    finally:
        stop_process(server)


def _refusals_in(log: str) -> list[str]:
    return [line for line in log.splitlines() if "model swap refused" in line]


def test_a_swap_to_a_corrupt_checkpoint_is_refused_and_the_old_model_keeps_serving(
    registry: Registry, path_server: tuple[ServerProcess, Path]
) -> None:
    server, folder = path_server
    (folder / "model.pt").write_bytes(b"not a checkpoint" * 100)
    os.kill(server.pid, signal.SIGHUP)
    wait_until(lambda: bool(_refusals_in(server.log())), 120, "the refusal", server)
    refused = settled_metric(
        server, "digitflow_model_swaps_refused_total", ["digitflow_model_swaps_refused_total 1"]
    )
    wait_until(
        lambda: "last_refused_swap" in httpx.get(server.url + "/ready").text, 10, "/ready", server
    )
    ready = httpx.get(server.url + "/ready", timeout=30)
    assert len(_refusals_in(server.log())) == 1
    assert ready.status_code == 200 and ready.json()["model_uuid"] == "a"
    assert ready.json()["refused_swaps"] == 1
    assert "checkpoint" in ready.json()["last_refused_swap"]["reason"]
    assert refused == ["digitflow_model_swaps_refused_total 1"]
    assert served_versions(server) == {"a"}
    assert which_model(probabilities(server, registry.sample), registry.expected) == (
        registry.good.run_id
    )
    # The file on disk is corrupt now; a respawned worker serves the verified copy.
    victim = worker_pids(server.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for_replacement(server.pid, victim)
    wait_for_http(server, "/ready", timeout=60)
    time.sleep(2.0)  # the respawned worker loads its model
    assert server.alive()
    assert served_versions(server, 24) == {"a"}


def test_a_swap_to_a_model_failing_its_golden_self_test_is_refused_with_one_log_line(
    registry: Registry, path_server: tuple[ServerProcess, Path]
) -> None:
    server, folder = path_server
    shutil.copy(registry.other.model_path, folder / "model.pt")
    shutil.copy(registry.other.model_path.parent / "golden.json", folder / "golden.json")
    _tamper_golden(folder / "model.pt")
    os.kill(server.pid, signal.SIGHUP)
    wait_until(lambda: bool(_refusals_in(server.log())), 120, "the refusal", server)
    wait_until(
        lambda: "last_refused_swap" in httpx.get(server.url + "/ready").text, 10, "/ready", server
    )
    lines = _refusals_in(server.log())
    ready = httpx.get(server.url + "/ready", timeout=30).json()
    assert len(lines) == 1 and "golden self-test failed" in lines[0]
    assert "1/8 images disagree" in ready["last_refused_swap"]["reason"]
    assert settled_metric(
        server, "digitflow_model_swaps_refused_total", ["digitflow_model_swaps_refused_total 1"]
    ) == ["digitflow_model_swaps_refused_total 1"]
    assert which_model(probabilities(server, registry.sample), registry.expected) == (
        registry.good.run_id
    )


POLL_SECONDS = 10


@pytest.mark.parametrize("alias_server", [{"MODEL_POLL_SECONDS": str(POLL_SECONDS)}], indirect=True)
def test_a_moved_registry_alias_is_followed_within_two_poll_periods(
    registry: Registry, alias_server: tuple[ServerProcess, Callable[[int], None]]
) -> None:
    server, move = alias_server
    other = registry.other.run_id
    move(2)
    moved_at = time.monotonic()
    wait_until(lambda: served_versions(server, 8) == {other}, 120, "the new version", server)
    followed_in = time.monotonic() - moved_at
    print(f"\nalias followed in {followed_in:.1f} s (poll every {POLL_SECONDS} s)")
    assert followed_in <= 2 * POLL_SECONDS
    assert which_model(probabilities(server, registry.sample), registry.expected) == other
    assert "model swap (alias)" in server.log()


@pytest.mark.parametrize("alias_server", [{"MODEL_POLL_SECONDS": "1"}], indirect=True)
def test_an_alias_moved_to_a_model_failing_its_golden_check_is_refused_once_not_in_a_loop(
    registry: Registry, alias_server: tuple[ServerProcess, Callable[[int], None]]
) -> None:
    server, move = alias_server
    move(3)
    wait_until(lambda: bool(_refusals_in(server.log())), 120, "the refusal", server)
    time.sleep(5.0)  # five more polls see the same refused version
    ready = httpx.get(server.url + "/ready", timeout=30).json()
    assert len(_refusals_in(server.log())) == 1
    assert ready["ready"] is True and ready["model_uuid"] == registry.good.run_id
    assert ready["last_refused_swap"]["model_uuid"] == registry.bad_golden.run_id
    assert settled_metric(
        server, "digitflow_model_swaps_refused_total", ["digitflow_model_swaps_refused_total 1"]
    ) == ["digitflow_model_swaps_refused_total 1"]
    assert served_versions(server) == {registry.good.run_id}


def test_a_worker_respawned_after_a_swap_serves_the_new_model(
    registry: Registry, alias_server: tuple[ServerProcess, Callable[[int], None]]
) -> None:
    server, move = alias_server
    other = registry.other.run_id
    move(2)
    os.kill(server.pid, signal.SIGHUP)
    wait_until(lambda: served_versions(server, 8) == {other}, 120, "the new version", server)
    victim = worker_pids(server.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for_replacement(server.pid, victim)
    wait_until(
        lambda: (
            metric_lines(server, "digitflow_model_info")
            == [f'digitflow_model_info{{model_uuid="{other}"}} 2']
        ),
        60,
        "both workers in /metrics",
        server,
    )
    answers = {which_model(probabilities(server, registry.sample), registry.expected)}
    assert served_versions(server, 24) == {other}
    assert answers == {other}


def test_sighup_sent_to_the_digitflow_serve_pid_swaps_the_model(
    registry: Registry, tmp_path: Path
) -> None:
    # `digitflow serve` execs gunicorn: its pid is the master's, and it keeps the URI configured.
    name = f"swap-serve-{tmp_path.name[:30]}"
    move = _register(registry.url, name, [registry.good, registry.other])
    port = free_port()
    cli = str(Path(sys.executable).parent / "digitflow")
    command = [cli, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    env = {
        "MLFLOW_TRACKING_URI": registry.url,
        "PRED_MODEL_URI": f"models:/{name}@champion",
        "PRED_MODELS_DIR": str(tmp_path / "models"),
    }
    server = start_process(command, tmp_path / "s.log", f"http://127.0.0.1:{port}", env)
    try:
        wait_for_http(server, "/ready", timeout=180)
        assert served_versions(server) == {registry.good.run_id}
        move(2)
        os.kill(server.pid, signal.SIGHUP)
        wait_until(
            lambda: served_versions(server, 8) == {registry.other.run_id}, 120, "swap", server
        )
        assert server.alive()
        assert worker_pids(server.pid)  # the pid signalled is gunicorn's master
    finally:
        stop_process(server)


def test_a_registry_that_stops_answering_never_affects_serving(
    registry: Registry, data_dir: Path, tmp_path: Path
) -> None:
    from tests.support.mlflow_server import start_mlflow_server

    own = start_mlflow_server(tmp_path / "mlflow")  # this one is stopped mid-test
    try:
        run = _train(own.url, data_dir, seed=1)
        _register(own.url, "down", [run])
        env = {
            "MLFLOW_TRACKING_URI": own.url,
            "PRED_MODEL_URI": "models:/down@champion",
            "MODEL_POLL_SECONDS": "1",
        }
        server = _serve(tmp_path, env)
    finally:
        stop_process(own)
    try:
        wait_until(lambda: "registry did not answer" in server.log(), 60, "the warning", server)
        time.sleep(3.0)  # three more failed polls
        answers = [probabilities(server, registry.sample) for _ in range(10)]
        ready = httpx.get(server.url + "/ready", timeout=30)
        warnings = server.log().count("registry did not answer")
    finally:
        stop_process(server)
    assert len(answers) == 10
    assert ready.status_code == 200 and ready.json()["model_uuid"] == run.run_id
    assert warnings == 1  # once per outage, not once per poll


def test_the_model_keeper_imports_nothing_from_the_master_s_working_folder(
    registry: Registry, tmp_path: Path
) -> None:
    # The seed's gunicorn command with the package's config, from a folder where someone
    # planted argparse.py (gunicorn imported the real one before it put that folder on sys.path).
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    marker = tmp_path / "planted-module-ran"
    (workdir / "argparse.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    folder = tmp_path / "serving"
    folder.mkdir()
    shutil.copy(registry.good.model_path, folder / "model.pt")
    shutil.copy(registry.good.model_path.parent / "golden.json", folder / "golden.json")
    port = free_port()
    command = [
        GUNICORN,
        "digitflow_fastapi.main:APP",
        "-c",
        "python:digitflow_fastapi.lifecycle.gunicorn_conf",
        "-b",
        f"127.0.0.1:{port}",
        "-w",
        "1",
        "-k",
        "uvicorn.workers.UvicornWorker",
    ]
    env = {
        "PRED_MODEL_PATH": str(folder / "model.pt"),
        "PRED_MODEL_UUID": "a",
        "PYTHONPATH": os.pathsep.join([str(SRC_DIR), str(SRC_DIR.parent)]),
    }
    server = start_process(command, tmp_path / "g.log", f"http://127.0.0.1:{port}", env, workdir)
    try:
        wait_for_http(server, "/ready", timeout=180)
        shutil.copy(registry.other.model_path, folder / "model.pt")
        shutil.copy(registry.other.model_path.parent / "golden.json", folder / "golden.json")
        os.kill(server.pid, signal.SIGHUP)
        wait_until(
            lambda: (
                which_model(probabilities(server, registry.sample), registry.expected)
                == registry.other.run_id
            ),
            120,
            "the swapped model",
            server,
        )
    finally:
        stop_process(server)
    assert not marker.exists(), "the keeper imported argparse.py from the working folder"
    assert "model swap (hup)" in server.log()


KEY = "ops-test-key-0123456789"


def test_with_api_keys_the_open_ready_probe_shows_no_paths_nor_refusals(
    registry: Registry, tmp_path: Path
) -> None:
    folder = tmp_path / "serving"
    folder.mkdir()
    shutil.copy(registry.good.model_path, folder / "model.pt")
    shutil.copy(registry.good.model_path.parent / "golden.json", folder / "golden.json")
    env = {"PRED_MODEL_PATH": str(folder / "model.pt"), "PRED_MODEL_UUID": "a", "API_KEYS": KEY}
    server = _serve(tmp_path, env)
    key = {"X-API-Key": KEY}
    try:
        (folder / "model.pt").write_bytes(b"not a checkpoint" * 100)
        os.kill(server.pid, signal.SIGHUP)
        wait_until(lambda: bool(_refusals_in(server.log())), 120, "the refusal", server)
        wait_until(
            lambda: "last_refused_swap" in httpx.get(server.url + "/ready", headers=key).text,
            10,
            "/ready",
            server,
        )
        # Both workers, on fresh connections (SO_REUSEPORT spreads them).
        open_answers = [httpx.get(server.url + "/ready", timeout=30) for _ in range(8)]
        wrong_key = httpx.get(server.url + "/ready", headers={"X-API-Key": "n" * 20}, timeout=30)
        detailed = httpx.get(server.url + "/ready", headers=key, timeout=30)
    finally:
        stop_process(server)
    for answer in [*open_answers, wrong_key]:
        assert answer.status_code == 200
        assert answer.json() == {"ready": True, "model_uuid": "a"}
    assert detailed.json()["refused_swaps"] == 1
    assert detailed.json()["golden_checked"] == 8
    assert "checkpoint" in detailed.json()["last_refused_swap"]["reason"]
    assert "golden_file" not in detailed.json()  # the state folder's path, never shown
