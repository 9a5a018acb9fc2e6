"""Shared fixtures. Servers are real processes on 127.0.0.1, stopped by PID after use."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from digitflow.data.mnist import prepare_data
from tests.support.mlflow_server import start_mlflow_server
from tests.support.processes import ServerProcess, stop_process

pytest_plugins: list[str] = ["tests.support.artifact_stores", "tests.support.gunicorn_server"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real MNIST PNGs + CSVs, prepared once per test session."""
    return prepare_data(tmp_path_factory.mktemp("data") / "mnist", progress=False).data_dir


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A plain `mlflow server` (SQLite, local artifact root), shared by the session."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server
    finally:
        stop_process(server)
