"""Process faults under steady load, against the seed's gunicorn command with 2 workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.gunicorn_server import (
    TrainedModel,
    start_gunicorn,
    wait_for_replacement,
    worker_pids,
)
from tests.support.processes import ServerProcess, stop_process, wait_for_http

pytestmark = pytest.mark.slow  # starts real servers or trains a model

PREDICT = "/api/v1/model/predict"


@dataclass
class Outcome:
    sent_at: float
    ok: bool
    right: bool = True
    error: str = ""


@dataclass
class Load:
    """Clients posting real test digits in a loop, each answer checked.

    `keep_alive=False` opens a new connection per request: such a connection can be waiting in a
    worker's listening queue when the worker stops, which keep-alive clients never are.
    """

    server: ServerProcess
    samples: list[tuple[bytes, int]]
    clients: int = 8
    keep_alive: bool = True
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def _client(self) -> httpx.Client:
        limits = httpx.Limits(max_keepalive_connections=None if self.keep_alive else 0)
        return httpx.Client(base_url=self.server.url, timeout=20, limits=limits)

    def _client_loop(self, index: int) -> None:
        client = self._client()
        i = index
        while not self.stop.is_set():
            data, label = self.samples[i % len(self.samples)]
            i += self.clients
            sent_at = time.monotonic()
            try:
                answer = client.post(PREDICT, files={"image_file": ("d.png", data)})
                ok = answer.status_code == 200
                right = ok and answer.json()["data"][0]["prediction"] == str(label)
                error = "" if ok else f"HTTP {answer.status_code}"
                self.outcomes.append(Outcome(sent_at, ok, right or not ok, error))
            except httpx.HTTPError as exc:
                self.outcomes.append(Outcome(sent_at, False, error=repr(exc)))
                client.close()
                client = self._client()
                time.sleep(0.05)
        client.close()

    def start(self) -> None:
        self.threads = [
            threading.Thread(target=self._client_loop, args=(i,), daemon=True)
            for i in range(self.clients)
        ]
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def failed(self, sent_before: float = float("inf")) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok and o.sent_at < sent_before]


@contextlib.contextmanager
def loaded_server(
    model: TrainedModel, data_dir: Path, log_path: Path, **load_options: Any
) -> Iterator[tuple[ServerProcess, Load]]:
    """The seed's command on `model` with a running `Load`; both stopped on the way out."""
    server = start_gunicorn(log_path, {"PRED_MODEL_PATH": str(model.model_path)})
    load = Load(server, load_samples(data_dir, model), **load_options)
    try:
        wait_for_http(server, "/ready", timeout=120)
        load.start()
        time.sleep(2.0)
        yield server, load
    finally:
        load.finish()
        stop_process(server)


def load_samples(data_dir: Path, model: TrainedModel) -> list[tuple[bytes, int]]:
    """Test digits the served model gets right (so a wrong answer means mixed-up replies)."""
    from digitflow.inference.classifier import Classifier
    from digitflow.inference.preprocess import bytes_to_input

    classifier = Classifier.from_checkpoint(model.model_path)
    samples = []
    for path in sorted((data_dir / "test").glob("*/*.png"))[:200]:
        data = path.read_bytes()
        label = int(path.parent.name)
        if classifier.predict(bytes_to_input(data)[None])[0].label == label:
            samples.append((data, label))
    return samples


MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def resets_allowed(stops: int) -> int:
    """Connections the kernel may still reset across `stops` worker stops.

    The drain accepts what is queued and closes in the same instant, but a handshake completing
    in the microseconds between the last `accept` and the `close` is reset by the kernel (measured
    here at ~1,500 new connections/s: 1 request in 8-16 stops). `net.ipv4.tcp_migrate_req=1`
    moves those to a sibling socket: then nothing may be lost at all.
    """
    migrates = MIGRATE_REQ.exists() and MIGRATE_REQ.read_text().strip() == "1"
    return 0 if migrates else stops


def reset_by_the_kernel(outcome: Outcome) -> bool:
    return "reset by peer" in outcome.error or "without sending a response" in outcome.error


def refused(outcome: Outcome) -> bool:
    """Nothing listened when its connection was attempted: it reached no server (sent after the
    sockets closed, however early the client thread took its timestamp)."""
    return "Connection refused" in outcome.error


@pytest.mark.parametrize("keep_alive", [True, False], ids=["keep-alive", "new-connections"])
def test_sigterm_under_load_answers_every_request_sent_before_it_and_exits_0(
    trained_model: TrainedModel, data_dir: Path, tmp_path: Path, keep_alive: bool
) -> None:
    clients = 8 if keep_alive else 24
    with loaded_server(
        trained_model, data_dir, tmp_path / "g.log", clients=clients, keep_alive=keep_alive
    ) as (server, load):
        signalled_at = time.monotonic()
        os.kill(server.pid, signal.SIGTERM)
        returncode = server.process.wait(timeout=30)
    before = [o for o in load.outcomes if o.sent_at < signalled_at]
    assert len(before) > 50
    lost = [o for o in load.failed(sent_before=signalled_at) if not refused(o)]
    if keep_alive:
        assert lost == [], server.log()[-3000:]
    else:
        assert len(lost) <= resets_allowed(1), lost
        assert all(reset_by_the_kernel(o) for o in lost), lost
    assert all(o.right for o in load.outcomes)
    assert returncode == 0


def test_sigterm_to_one_worker_under_new_connection_load_fails_no_request(
    trained_model: TrainedModel, data_dir: Path, tmp_path: Path
) -> None:
    """A worker stopped on its own (max_requests, a scale-in) hands over what is queued to it."""
    with loaded_server(
        trained_model, data_dir, tmp_path / "g.log", clients=24, keep_alive=False
    ) as (server, load):
        for _ in range(3):
            victim = worker_pids(server.pid)[0]
            os.kill(victim, signal.SIGTERM)
            wait_for_replacement(server.pid, victim)
            time.sleep(1.5)  # the new worker loads its model, load keeps going
    assert len(load.outcomes) > 100
    lost = load.failed()  # before the drain: 21 over 3 stops
    assert len(lost) <= resets_allowed(3), lost
    assert all(reset_by_the_kernel(o) for o in lost), lost
    assert all(o.right for o in load.outcomes)


def test_kill_9_of_a_worker_fails_at_most_the_requests_in_flight_on_it(
    trained_model: TrainedModel, data_dir: Path, tmp_path: Path
) -> None:
    with loaded_server(trained_model, data_dir, tmp_path / "g.log") as (server, load):
        victim = worker_pids(server.pid)[0]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        time.sleep(8.0)
        load.finish()
        workers_after = worker_pids(server.pid)
    failed = load.failed()
    assert len(failed) <= load.clients  # at most one in flight per client
    assert all(o.right for o in load.outcomes)
    assert victim not in workers_after and len(workers_after) == 2  # replaced
    late = [o for o in load.outcomes if o.sent_at > killed_at + 5 and o.ok]
    early = [o for o in load.outcomes if killed_at - 2 < o.sent_at < killed_at and o.ok]
    print(
        f"kill -9: {len(failed)} failed; {len(early) / 2:.0f} req/s before, "
        f"{len(late) / 3:.0f} req/s 5-8 s after"
    )
    assert late, "no request succeeded 5 s after the kill"


def test_1500_requests_at_512_at_once_are_answered_or_refused_with_retry_after(
    trained_model: TrainedModel, data_dir: Path, tmp_path: Path
) -> None:
    server = start_gunicorn(tmp_path / "g.log", {"PRED_MODEL_PATH": str(trained_model.model_path)})
    sample = next((data_dir / "test" / "5").glob("*.png")).read_bytes()

    async def burst() -> list[tuple[int, str | None, float]]:
        # A new connection per request: a pooled keep-alive connection that the server closes as
        # idle just as the client reuses it is a client-side retry case, not what this measures.
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            gate = asyncio.Semaphore(512)

            async def one() -> tuple[int, str | None, float]:
                async with gate:
                    started = time.perf_counter()
                    try:
                        answer = await client.post(PREDICT, files={"image_file": ("5.png", sample)})
                    except httpx.HTTPError as exc:
                        return (0, type(exc).__name__, time.perf_counter() - started)
                    return (
                        answer.status_code,
                        answer.headers.get("retry-after"),
                        time.perf_counter() - started,
                    )

            return await asyncio.gather(*(one() for _ in range(1500)))

    try:
        wait_for_http(server, "/ready", timeout=120)
        results = asyncio.run(burst())
    finally:
        stop_process(server)
    answered = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert len(answered) + len(refused) == 1500, {r[:2] for r in results if r[0] not in (200, 503)}
    assert all(r[1] is not None for r in refused)
    latencies = sorted(r[2] for r in answered)
    p99 = latencies[int(len(latencies) * 0.99) - 1] if latencies else 0.0
    print(f"512 at once: {len(answered)} answered, {len(refused)} refused, p99 {p99 * 1000:.0f} ms")


def test_workers_stay_pinned_to_the_run_resolved_at_start_when_the_alias_moves(
    trained_model: TrainedModel, data_dir: Path, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from digitflow.artifacts.tracking import TrackingTarget
    from digitflow.inference.classifier import Classifier
    from digitflow.inference.preprocess import bytes_to_input
    from digitflow.training.config import load_train_config
    from digitflow.training.run import run_training

    mlruns = trained_model.model_path.parents[4]
    uri = f"sqlite:///{mlruns / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = f"pinned-{tmp_path.name}"
    client.create_registered_model(name)
    first = trained_model.run_id
    client.create_model_version(name, source=f"runs:/{first}/model", run_id=first)
    client.set_registered_model_alias(name, "champion", "1")
    env = {
        "MLFLOW_TRACKING_URI": uri,
        "PRED_MODEL_URI": f"models:/{name}@champion",
        "PRED_MODELS_DIR": str(tmp_path / "models"),
    }
    server = start_gunicorn(tmp_path / "g.log", env)
    sample = next((data_dir / "test" / "8").glob("*.png")).read_bytes()
    expected = Classifier.from_checkpoint(trained_model.model_path).predict(
        bytes_to_input(sample)[None]
    )[0]
    try:
        wait_for_http(server, "/ready", timeout=180)
        config = load_train_config(None, ["epochs=1", "train_limit=300", "golden_count=5"])
        second = run_training(config, data_dir, TrackingTarget(uri=uri), progress=False).run_id
        client.create_model_version(name, source=f"runs:/{second}/model", run_id=second)
        client.set_registered_model_alias(name, "champion", "2")
        victim = worker_pids(server.pid)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for_replacement(server.pid, victim)
        time.sleep(3.0)  # the new worker loads its model
        answers, versions = [], set()
        for _ in range(40):  # a new connection each time: both workers answer
            with httpx.Client(base_url=server.url, timeout=30) as fresh:
                reply = fresh.post(
                    PREDICT + "?probabilities=true", files={"image_file": ("8.png", sample)}
                ).json()["data"][0]
                answers.append(reply["probabilities"])
                versions.add(fresh.get("/api/v1/model/version").json()["data"]["model_uuid"])
    finally:
        stop_process(server)
    assert versions == {first}
    for probabilities in answers:
        assert probabilities == pytest.approx(list(expected.probabilities), abs=1e-5)


def test_a_worker_stopped_while_it_is_starting_answers_the_connections_queued_to_it(
    trained_model: TrainedModel, data_dir: Path, tmp_path: Path
) -> None:
    """Its socket listens from the fork on; connections queued during start-up are served."""
    env = {
        "PRED_MODEL_PATH": str(trained_model.model_path),
        "DIGITFLOW_CACHE_DIR": str(tmp_path / "cache"),  # an ONNX export makes start-up slower
    }
    sample = load_samples(data_dir, trained_model)[0]  # before the server: it takes a second
    server = start_gunicorn(tmp_path / "g.log", env, workers=1)
    results: list[int | str] = []

    def post() -> None:
        try:
            answer = httpx.post(
                server.url + PREDICT, files={"image_file": ("d.png", sample[0])}, timeout=60
            )
            results.append(answer.status_code)
        except httpx.HTTPError as exc:
            results.append(repr(exc))

    try:
        deadline = time.monotonic() + 60
        while "Waiting for application startup" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.01)
        worker = worker_pids(server.pid)[0]
        os.kill(worker, signal.SIGSTOP)  # frozen mid-start-up; its socket already listens
        stopped_during_start = "Application startup complete" not in server.log()
        clients = [threading.Thread(target=post) for _ in range(6)]
        for client in clients:
            client.start()
        time.sleep(0.5)  # the kernel completes their handshakes: queued on the worker's socket
        os.kill(worker, signal.SIGTERM)
        os.kill(worker, signal.SIGCONT)
        for client in clients:
            client.join(timeout=90)
    finally:
        stop_process(server)
    assert stopped_during_start, "the worker finished starting before the signal"
    assert results == [200] * 6, server.log()[-3000:]
