"""A slim install (the base dependencies: no torch, no full MLflow) serves and pulls; the commands
it cannot run say so in one line, never with a traceback. Simulated here by hiding the `train`
extra's modules from the import system (the slim image itself: tests/e2e/deploy)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from digitflow.artifacts import tracking
from digitflow.cli.common import MISSING_LIBRARY_EXIT, handle_errors
from digitflow.errors import ConfigError

# What the `train` extra brings that the base set lacks: torch, onnx, mlxtend, full MLflow's SQL.
TRAIN_ONLY = ("torch", "onnx", "mlxtend", "sqlalchemy", "alembic")

SLIM_PROBE = """
import importlib.abc, importlib.util, sys
hidden = {hidden}
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Hide())
found = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name.partition(".")[0] in hidden else found(name, package)
)
from digitflow.cli.main import app
app(args=sys.argv[1:], prog_name="digitflow")
"""


def run_slim(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`digitflow ARGS` in a fresh interpreter that cannot import the `train` extra."""
    probe = SLIM_PROBE.format(hidden=repr(set(TRAIN_ONLY)))
    return subprocess.run(
        [sys.executable, "-c", probe, *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "PYTHONPATH": ":".join(sys.path)},
        check=False,
    )


@pytest.mark.parametrize("command", [["train"], ["prepare-data"], ["export", "model.pt"]])
def test_a_command_needing_torch_says_so_in_one_line(command: list[str], tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"not read: torch is missing first")
    done = run_slim(command, tmp_path)
    assert done.returncode == MISSING_LIBRARY_EXIT, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "'torch'" in lines[0] and "digitflow[train]" in lines[0]


def test_the_embedded_store_without_full_mlflow_names_the_tracking_uri(tmp_path: Path) -> None:
    done = run_slim(["runs", "--mlruns-dir", str(tmp_path / "mlruns")], tmp_path)
    assert done.returncode == ConfigError.exit_code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "MLFLOW_TRACKING_URI" in lines[0] and "embedded store" in lines[0]
    assert not (tmp_path / "mlruns").exists()


def test_the_embedded_store_is_refused_before_anything_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracking, "sql_store_available", lambda: False)
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI"):
        tracking.embedded_target(tmp_path / "mlruns")
    assert not (tmp_path / "mlruns").exists()


def _app_raising(error: ModuleNotFoundError) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @handle_errors
    def command() -> None:
        raise error

    return app


def test_a_missing_third_party_module_is_one_line_and_exit_69() -> None:
    error = ModuleNotFoundError("No module named 'torch.onnx'", name="torch.onnx")
    result = CliRunner().invoke(_app_raising(error), [])
    assert result.exit_code == MISSING_LIBRARY_EXIT
    assert result.output.count("\n") == 1 and "'torch'" in result.output


def test_a_missing_module_of_digitflow_itself_keeps_its_traceback() -> None:
    error = ModuleNotFoundError("No module named 'digitflow.gone'", name="digitflow.gone")
    result = CliRunner().invoke(_app_raising(error), [])
    assert result.exit_code == 1
    assert isinstance(result.exception, ModuleNotFoundError)
