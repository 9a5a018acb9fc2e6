"""Start-up failures: the seed's gunicorn command and `digitflow serve` stop with one clear line."""

from __future__ import annotations

import json
import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from digitflow.errors import SelfTestFailed
from digitflow.inference.classifier import Classifier
from digitflow.inference.preprocess import bytes_to_input
from digitflow.inference.selftest import run_self_test
from tests.support.gunicorn_server import SRC_DIR, TrainedModel, start_gunicorn
from tests.support.processes import free_port, running, start_process

pytestmark = pytest.mark.slow  # starts real servers or trains a model


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def copy_with_wrong_golden(model: TrainedModel, folder: Path) -> Path:
    """The model beside a golden.json whose first answer is changed."""
    folder.mkdir(parents=True, exist_ok=True)
    model_path = folder / "model.pt"
    shutil.copy(model.model_path, model_path)
    golden = json.loads((model.model_path.parent / "golden.json").read_text())
    first = golden["images"][0]
    first["prediction"] = str((int(first["prediction"]) + 1) % 10)
    (folder / "golden.json").write_text(json.dumps(golden))
    return model_path


def run_gunicorn_until_exit(tmp_path: Path, model_path: Path) -> tuple[int, str]:
    server = start_gunicorn(tmp_path / "g.log", {"PRED_MODEL_PATH": str(model_path)}, workers=1)
    returncode = server.process.wait(timeout=120)
    return returncode, server.log()


def test_the_golden_self_test_passes_for_the_run_it_came_from(trained_model: TrainedModel) -> None:
    report = run_self_test(
        Classifier.from_checkpoint(trained_model.model_path), trained_model.model_path
    )
    assert report.golden_checked == 20
    assert report.warmed_up is True


def test_a_golden_mismatch_names_the_disagreeing_image(
    trained_model: TrainedModel, tmp_path: Path
) -> None:
    model_path = copy_with_wrong_golden(trained_model, tmp_path / "m")
    with pytest.raises(SelfTestFailed, match="1/20 images disagree"):
        run_self_test(Classifier.from_checkpoint(model_path), model_path)


@pytest.mark.parametrize("problem", ["missing", "corrupt", "malicious"])
def test_gunicorn_stops_with_a_clear_line_and_a_non_zero_exit(
    trained_model: TrainedModel, tmp_path: Path, problem: str
) -> None:
    marker = tmp_path / "executed"
    if problem == "missing":
        path, words = tmp_path / "absent.pt", "no checkpoint at"
    elif problem == "corrupt":
        path, words = tmp_path / "corrupt.pt", "not a readable PyTorch checkpoint"
        path.write_bytes(b"garbage" * 100)
    else:
        path, words = tmp_path / "evil.pt", "refused by the weights-only loader"
        torch.save({"model_state_dict": _Payload(marker)}, path, pickle_module=pickle)
    returncode, log = run_gunicorn_until_exit(tmp_path, path)
    assert returncode != 0
    assert "start-up failed: " in log and words in log and path.name in log
    assert "Traceback" not in log  # one line names the cause
    assert not marker.exists()


def test_digitflow_serve_exits_non_zero_on_a_golden_mismatch(
    trained_model: TrainedModel, tmp_path: Path
) -> None:
    model_path = copy_with_wrong_golden(trained_model, tmp_path / "g")
    cli = Path(sys.executable).parent / "digitflow"
    result = subprocess.run(
        [str(cli), "serve", "--host", "127.0.0.1", "--port", "1"],  # default --workers
        env={"PATH": "/usr/bin:/bin", "PRED_MODEL_PATH": str(model_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "golden self-test failed" in result.stderr + result.stdout


def test_the_gunicorn_command_refuses_a_port_another_server_listens_on(
    trained_model: TrainedModel, tmp_path: Path
) -> None:
    # Workers bind with SO_REUSEPORT; without the check a second server would share the port.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        server = start_gunicorn(
            tmp_path / "g.log", {"PRED_MODEL_PATH": str(trained_model.model_path)}, port=port
        )
        returncode = server.process.wait(timeout=120)
    assert returncode != 0
    assert f"127.0.0.1:{port} is already in use" in server.log()


def test_pred_model_uri_pulls_the_run_at_start_up_and_serves_it(
    trained_model: TrainedModel, tmp_path: Path
) -> None:
    # The trained_model fixture's embedded store: <mlruns>/artifacts/<run>/artifacts/model/model.pt
    mlruns = trained_model.model_path.parents[4]
    models_dir = tmp_path / "models"
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{mlruns / 'mlflow.db'}",
        "PRED_MODEL_URI": f"runs:/{trained_model.run_id}/model",
        "PRED_MODELS_DIR": str(models_dir),
    }
    server = start_gunicorn(tmp_path / "g.log", env, workers=1)
    with running(server, "/ready", timeout=180):
        version = httpx.get(server.url + "/api/v1/model/version", timeout=30).json()
        ready = httpx.get(server.url + "/ready", timeout=30).json()
    pulled = models_dir / trained_model.run_id / "artifacts" / "model" / "model.pt"
    assert pulled.read_bytes() == trained_model.model_path.read_bytes()
    assert version == {"data": {"model_uuid": trained_model.run_id}}
    assert ready["ready"] is True and ready["golden_checked"] == 20


def test_plain_uvicorn_from_src_serves_a_v1_predict_request(
    trained_model: TrainedModel, tmp_path: Path, data_dir: Path
) -> None:
    # The seed's command for Windows users: `uvicorn digitflow_fastapi.main:APP` from src/.
    port = free_port()
    uvicorn = str(Path(sys.executable).parent / "uvicorn")
    command = [uvicorn, "digitflow_fastapi.main:APP", "--host", "127.0.0.1", "--port", str(port)]
    env = {"PRED_MODEL_PATH": str(trained_model.model_path), "PRED_MODEL_UUID": "u1"}
    server = start_process(command, tmp_path / "u.log", f"http://127.0.0.1:{port}", env, SRC_DIR)
    sample = next((data_dir / "test" / "7").glob("*.png"))
    with running(server, "/ready", timeout=120):
        answer = httpx.post(
            server.url + "/api/v1/model/predict",
            files={"image_file": ("digit.png", sample.read_bytes())},
            timeout=30,
        )
    expected = Classifier.from_checkpoint(trained_model.model_path).predict(
        bytes_to_input(sample.read_bytes())[None]
    )[0]
    assert answer.status_code == 200
    assert answer.json() == {
        "data": [{"image_filename": "digit.png", "prediction": str(expected.label)}]
    }


def test_a_golden_mismatch_keeps_the_worker_up_but_unready(
    trained_model: TrainedModel, tmp_path: Path
) -> None:
    model_path = copy_with_wrong_golden(trained_model, tmp_path / "g")
    server = start_gunicorn(tmp_path / "g.log", {"PRED_MODEL_PATH": str(model_path)}, workers=1)
    with running(server, "/health", timeout=120):
        deadline = time.monotonic() + 60
        while "self_test" not in (ready := httpx.get(server.url + "/ready", timeout=30)).text:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.3)
        answer = httpx.post(
            server.url + "/api/v1/model/predict",
            files={"image_file": ("a.png", b"\x89PNG\r\n\x1a\n")},
            timeout=30,
        )
        alive = httpx.get(server.url + "/health", timeout=30)
    assert ready.status_code == 503
    assert ready.json()["self_test"] == "failed"
    assert "1/20 images disagree" in ready.json()["detail"]
    assert answer.status_code == 503 and "golden self-test" in answer.json()["detail"]
    assert alive.status_code == 200
    assert "1/20 images disagree" in server.log()


def test_the_gunicorn_command_opens_no_shared_control_socket(
    trained_model: TrainedModel, tmp_path: Path
) -> None:
    # gunicorn's default control socket is one path per user: two servers would share it.
    home = tmp_path / "home"
    home.mkdir()
    env = {"PRED_MODEL_PATH": str(trained_model.model_path), "HOME": str(home)}
    env["XDG_RUNTIME_DIR"] = str(tmp_path / "runtime")
    (tmp_path / "runtime").mkdir()
    server = start_gunicorn(tmp_path / "g.log", env, workers=1)
    with running(server, "/ready", timeout=120):
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        sockets = list(home.rglob("*.ctl")) + list((tmp_path / "runtime").rglob("*.ctl"))
    assert sockets == []
