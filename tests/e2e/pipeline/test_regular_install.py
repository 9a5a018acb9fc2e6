"""`pip install .` (not editable) into a fresh venv, then `digitflow serve` from another folder."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import httpx
import pytest

from tests.support.gunicorn_server import TrainedModel
from tests.support.processes import free_port, running, start_process

pytestmark = pytest.mark.slow  # starts real servers or trains a model

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding a regular install (the wheel `pip` builds) of this checkout.

    Its dependencies are borrowed from the test venv through a `.pth` path line (a plain path:
    the test venv's own `.pth` files, the editable install among them, are not processed), so
    `digitflow` itself is imported from the fresh venv's site-packages and nowhere else.
    """
    venv = tmp_path_factory.mktemp("regular") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheels = tmp_path_factory.mktemp("wheels")
    pip_quiet = ["-m", "pip", "--quiet", "--disable-pip-version-check"]
    build = ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)]
    subprocess.run(
        [sys.executable, *pip_quiet, *build],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("digitflow-*.whl")
    subprocess.run(
        [str(python), *pip_quiet, "install", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=300,
    )
    return venv


def test_a_regular_install_imports_digitflow_from_its_own_site_packages(
    installed_venv: Path, tmp_path: Path
) -> None:
    code = (
        "import digitflow, digitflow.paths as p, digitflow_fastapi.lifecycle.gunicorn_conf as g; "
    )
    code += "print(digitflow.__file__); print(p.DEFAULT_LOGGING_CONFIG.is_file())"
    out = subprocess.run(
        [str(installed_venv / "bin" / "python"), "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout.split()
    assert out[0].startswith(str(installed_venv)) and "site-packages" in out[0]
    assert out[1] == "True"  # the default configs ship inside the package


def test_digitflow_serve_from_a_regular_install_answers_a_v1_predict_request(
    installed_venv: Path, trained_model: TrainedModel, data_dir: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port = free_port()
    command = [
        str(installed_venv / "bin" / "digitflow"),
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {
        "PRED_MODEL_PATH": str(trained_model.model_path),
        "PRED_MODEL_UUID": trained_model.run_id,
        "HOME": str(tmp_path / "home"),
        "DIGITFLOW_CACHE_DIR": str(tmp_path / "cache"),
    }
    server = start_process(
        command, tmp_path / "serve.log", f"http://127.0.0.1:{port}", env, elsewhere
    )
    sample = next((data_dir / "test" / "3").glob("*.png"))
    with running(server, "/ready", timeout=180):
        answer = httpx.post(
            server.url + "/api/v1/model/predict",
            files={"image_file": ("three.png", sample.read_bytes())},
            timeout=30,
        )
        version = httpx.get(server.url + "/api/v1/model/version", timeout=30).json()
    assert answer.status_code == 200, server.log()
    assert answer.json() == {"data": [{"image_filename": "three.png", "prediction": "3"}]}
    assert version == {"data": {"model_uuid": trained_model.run_id}}
    assert not list(elsewhere.iterdir())  # nothing written where it was started
