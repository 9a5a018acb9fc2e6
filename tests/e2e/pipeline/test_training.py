"""Training tracked in MLflow: the embedded store by default, a real `mlflow server` when given."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from digitflow.data.mnist import load_split
from digitflow.inference.preprocess import bytes_to_input
from digitflow.training.default_model import ensure_default_model
from digitflow.training.net import Net
from tests.support.processes import ServerProcess, free_port

pytestmark = pytest.mark.slow  # starts real servers or trains a model

DIGITFLOW = str(Path(sys.executable).with_name("digitflow"))
QUICK = ["epochs=2", "train_limit=600", "golden_count=12", "mlflow_run_name=quick"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run(
        [DIGITFLOW, *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        timeout=300,
    )


def run_id_from(stdout: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith("run UUID:"))
    return line.split()[-1]


@pytest.fixture(scope="module")
def embedded_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    mlruns = tmp_path_factory.mktemp("embedded") / "mlruns"
    result = run_cli("train", *QUICK, "--data-dir", str(data_dir), "--mlruns-dir", str(mlruns))
    assert result.returncode == 0, result.stderr
    return mlruns, run_id_from(result.stdout)


def test_train_logs_params_and_one_metric_point_per_epoch(embedded_run: tuple[Path, str]) -> None:
    mlruns, run_id = embedded_run
    client = MlflowClient(tracking_uri=f"sqlite:///{mlruns / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "2" and run.data.params["train_bs"] == "32"
    assert run.data.params["train_size"] == "600" and run.data.params["test_size"] == "1000"
    for metric in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        history = client.get_metric_history(run_id, metric)
        assert sorted(point.step for point in history) == [1, 2], metric
    assert run.data.metrics["test_accuracy"] > 0.5


def test_embedded_store_lives_in_mlruns_with_artifacts_under_the_run_uuid(
    embedded_run: tuple[Path, str],
) -> None:
    mlruns, run_id = embedded_run
    assert (mlruns / "mlflow.db").is_file()
    run_dir = mlruns / "artifacts" / run_id / "artifacts"
    assert (run_dir / "model" / "model.pt").is_file()
    assert (run_dir / "train_model_config.json").is_file()
    assert (run_dir / "model" / "golden.json").is_file()


def test_logged_model_loads_weights_only_into_net_and_predicts(
    embedded_run: tuple[Path, str], data_dir: Path
) -> None:
    mlruns, run_id = embedded_run
    client = MlflowClient(tracking_uri=f"sqlite:///{mlruns / 'mlflow.db'}")
    listed = {a.path for a in client.list_artifacts(run_id)}
    assert {"model", "train_model_config.json"} <= listed
    path = mlruns / "artifacts" / run_id / "artifacts" / "model" / "model.pt"
    checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    assert checkpoint["epoch"] == 2
    model = Net()
    model.load_state_dict(checkpoint["model_state_dict"])
    model.eval()
    test = load_split(data_dir, "test")
    with torch.inference_mode():
        accuracy = (model(test.images).argmax(1) == test.labels).float().mean().item()
    assert accuracy > 0.5


def test_logged_config_is_the_resolved_config(embedded_run: tuple[Path, str]) -> None:
    mlruns, run_id = embedded_run
    path = mlruns / "artifacts" / run_id / "artifacts" / "train_model_config.json"
    config = json.loads(path.read_text())
    assert config["epochs"] == 2 and config["train_limit"] == 600
    assert config["mlflow_exp_name"] == "digitflow"


def test_golden_set_holds_pngs_with_the_models_own_predictions(
    embedded_run: tuple[Path, str],
) -> None:
    import base64

    mlruns, run_id = embedded_run
    model_dir = mlruns / "artifacts" / run_id / "artifacts" / "model"
    golden = json.loads((model_dir / "golden.json").read_text())
    assert golden["format"] == 1 and len(golden["images"]) == 12
    assert len({item["label"] for item in golden["images"]}) == 10
    model = Net()
    model.load_state_dict(torch.load(model_dir / "model.pt", weights_only=True)["model_state_dict"])
    model.eval()
    for item in golden["images"]:
        array = bytes_to_input(base64.b64decode(item["png_base64"]))
        with torch.inference_mode():
            label = int(model(torch.from_numpy(array).view(1, 1, 28, 28)).argmax())
        assert str(label) == item["prediction"]


def test_train_logs_to_a_real_mlflow_server(
    mlflow_server: ServerProcess, data_dir: Path, tmp_path: Path
) -> None:
    result = run_cli(
        "train",
        *QUICK,
        "epochs=1",
        "mlflow_exp_name=remote",
        "--data-dir",
        str(data_dir),
        "--mlruns-dir",
        str(tmp_path / "unused"),
        env={"MLFLOW_TRACKING_URI": mlflow_server.url},
    )
    assert result.returncode == 0, result.stderr
    run_id = run_id_from(result.stdout)
    client = MlflowClient(tracking_uri=mlflow_server.url)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "remote"
    assert [p.step for p in client.get_metric_history(run_id, "test_loss")] == [1]
    assert {a.path for a in client.list_artifacts(run_id, "model")} >= {
        "model/model.pt",
        "model/golden.json",
    }
    assert not (tmp_path / "unused").exists()


def test_default_model_is_trained_once_then_reused(data_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text("epochs: 1\ntrain_limit: 300\ngolden_count: 10\n")
    first = ensure_default_model(config, data_dir, tmp_path / "mlruns", progress=False)
    second = ensure_default_model(config, data_dir, tmp_path / "mlruns", progress=False)
    assert first.trained_now and not second.trained_now
    assert second.run_id == first.run_id and second.model_path.is_file()
    config.write_text("epochs: 1\ntrain_limit: 200\ngolden_count: 10\n")
    changed = ensure_default_model(config, data_dir, tmp_path / "mlruns", progress=False)
    assert changed.trained_now and changed.run_id != first.run_id


def _assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and text in lines[-1], result.stderr


def test_train_names_an_unknown_override_key(data_dir: Path, tmp_path: Path) -> None:
    result = run_cli("train", "epoch=1", "--data-dir", str(data_dir), "--mlruns-dir", str(tmp_path))
    _assert_one_line_error(result, 2, "unknown config key(s): epoch")


def test_train_names_a_missing_config_file(tmp_path: Path) -> None:
    result = run_cli("train", "--config", str(tmp_path / "none.yaml"))
    _assert_one_line_error(result, 2, "does not exist")


def test_train_names_a_malformed_config_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    result = run_cli("train", "--config", str(bad))
    _assert_one_line_error(result, 2, "not valid YAML")


def test_train_names_a_data_folder_that_does_not_exist(tmp_path: Path) -> None:
    result = run_cli(
        "train", "epochs=1", "--data-dir", str(tmp_path / "nodata"), "--mlruns-dir", str(tmp_path)
    )
    _assert_one_line_error(result, 3, "does not exist")


def test_train_names_an_unreachable_tracking_server(data_dir: Path, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run_cli(
        "train", "epochs=1", "--data-dir", str(data_dir), env={"MLFLOW_TRACKING_URI": url}
    )
    _assert_one_line_error(result, 4, "did not answer within 5 s")
