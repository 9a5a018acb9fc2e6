"""Fixtures: a quickly trained model and the seed's gunicorn command run from `src/`."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from digitflow import paths
from tests.support.processes import (
    ServerProcess,
    free_port,
    start_process,
    stop_process,
    wait_for_http,
)

SRC_DIR = paths.PACKAGE_DIR.parent
GUNICORN = str(Path(sys.executable).parent / "gunicorn")


@dataclass(frozen=True)
class TrainedModel:
    run_id: str
    model_path: Path


@pytest.fixture(scope="session")
def trained_model(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    """A 2-epoch model with 20 golden images, trained once per session (~10 s)."""
    from digitflow.artifacts.tracking import embedded_target
    from digitflow.training.config import load_train_config
    from digitflow.training.run import run_training

    target = embedded_target(tmp_path_factory.mktemp("serve-mlruns") / "mlruns")
    config = load_train_config(None, ["epochs=2", "golden_count=20"])
    run = run_training(config, data_dir, target, progress=False)
    uri = target.client().get_run(run.run_id).info.artifact_uri
    model_path = Path(unquote(urlparse(str(uri)).path)) / "model" / "model.pt"
    return TrainedModel(run_id=run.run_id, model_path=model_path)


def start_gunicorn(
    log_path: Path, env: dict[str, str], workers: int = 2, port: int | None = None
) -> ServerProcess:
    """The seed's command, from `src/`, bound to 127.0.0.1 on a free port."""
    port = port or free_port()
    command = [
        GUNICORN,
        "digitflow_fastapi.main:APP",
        "-b",
        f"127.0.0.1:{port}",
        "-w",
        str(workers),
        "-k",
        "uvicorn.workers.UvicornWorker",
    ]
    return start_process(command, log_path, f"http://127.0.0.1:{port}", env=env, cwd=SRC_DIR)


def serve(
    log_path: Path,
    model: TrainedModel,
    extra_env: dict[str, str] | None = None,
    workers: int = 2,
) -> Iterator[ServerProcess]:
    """Start gunicorn on `model`, wait until /ready answers, stop it by PID afterwards."""
    env = {
        "PRED_MODEL_PATH": str(model.model_path),
        "PRED_MODEL_UUID": model.run_id,
        **(extra_env or {}),
    }
    server = start_gunicorn(log_path, env, workers=workers)
    try:
        wait_for_http(server, "/ready", timeout=120)
        yield server
    finally:
        stop_process(server)


def worker_pids(master: int) -> list[int]:
    """The master's children that are workers (not the model keeper's child processes)."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    pids = []
    for pid in children:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"model_keeper" not in command:
            pids.append(int(pid))
    return pids


def wait_for_replacement(master: int, victim: int, workers: int = 2) -> None:
    """Until gunicorn has replaced the worker `victim` (two minutes at most)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        current = worker_pids(master)
        if victim not in current and len(current) == workers:
            return
        time.sleep(0.2)
    raise AssertionError(f"worker {victim} was not replaced")
