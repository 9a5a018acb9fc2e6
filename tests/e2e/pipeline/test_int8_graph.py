"""Training keeps a checked int8 graph beside `model.onnx`, and `INFERENCE_BACKEND=onnx-int8`
serves it: same classes as the float graph on ≥ 99.5 % of the 1,000 held-out PNGs, accuracy
within 0.2 pp (the photo figures for the default model are in test_photo_accuracy.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest

from digitflow.artifacts.run_layout import EMBEDDED_STORE_DB
from digitflow.data.mnist import read_annotations
from digitflow.inference.classifier import Classifier
from digitflow.inference.preprocess import bytes_to_input
from digitflow.inference.served_graph import read_record
from digitflow.training.quantize import MAX_ACCURACY_DROP, MIN_AGREEMENT
from tests.support.gunicorn_server import TrainedModel, serve
from tests.support.processes import ServerProcess

pytestmark = pytest.mark.slow  # trains a model and starts a real server


@pytest.fixture(scope="module")
def held_out(data_dir: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """The 1,000 held-out PNGs, their inputs as the server feeds them, and their labels."""
    rows = read_annotations(data_dir, "test")
    files = [data_dir / path for path, _ in rows]
    inputs = np.stack([bytes_to_input(path.read_bytes()) for path in files])[:, None]
    return files, inputs, np.array([label for _, label in rows])


def test_training_keeps_the_int8_graph_with_the_figures_of_its_check(
    trained_model: TrainedModel, held_out: tuple[list[Path], np.ndarray, np.ndarray]
) -> None:
    _, inputs, labels = held_out
    checkpoint = trained_model.model_path
    assert (checkpoint.parent / "model.int8.onnx").is_file()
    record = read_record(checkpoint.parent / "MLmodel")
    assert record is not None and record.int8_sha256 is not None
    int8 = Classifier.from_checkpoint(checkpoint, backend="onnx-int8").log_probabilities(inputs)
    float_ = Classifier.from_checkpoint(checkpoint, backend="onnx").log_probabilities(inputs)
    agreement = float(np.mean(int8.argmax(1) == float_.argmax(1)))
    int8_accuracy = float(np.mean(int8.argmax(1) == labels))
    float_accuracy = float(np.mean(float_.argmax(1) == labels))
    print(f"agreement {agreement:.4f}, accuracy int8 {int8_accuracy:.4f} float {float_accuracy}")
    assert agreement >= MIN_AGREEMENT
    assert abs(int8_accuracy - float_accuracy) <= MAX_ACCURACY_DROP + 1e-9
    assert record.int8_check["held_out_images"] == len(labels)
    assert record.int8_check["agreement"] == pytest.approx(agreement)
    assert record.int8_check["int8_accuracy"] == pytest.approx(int8_accuracy)
    assert record.int8_check["float_accuracy"] == pytest.approx(float_accuracy)


def test_the_run_logs_the_int8_check_as_metrics_and_a_tag(trained_model: TrainedModel) -> None:
    mlruns = trained_model.model_path.parents[4]  # mlruns/artifacts/<run>/artifacts/model/
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{mlruns / EMBEDDED_STORE_DB}")
    run = client.get_run(trained_model.run_id)
    record = read_record(trained_model.model_path.parent / "MLmodel")
    assert record is not None
    assert run.data.tags["digitflow.int8"] == "kept"
    assert run.data.metrics["int8_agreement"] == pytest.approx(record.int8_check["agreement"])
    assert run.data.metrics["int8_test_accuracy"] == pytest.approx(
        record.int8_check["int8_accuracy"]
    )


@pytest.fixture(scope="module")
def int8_server(
    trained_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, Path]]:
    log = tmp_path_factory.mktemp("int8-server") / "gunicorn.log"
    for server in serve(log, trained_model, {"INFERENCE_BACKEND": "onnx-int8"}):
        yield server, log


def test_a_server_with_onnx_int8_answers_with_the_int8_graph(
    int8_server: tuple[ServerProcess, Path],
    trained_model: TrainedModel,
    held_out: tuple[list[Path], np.ndarray, np.ndarray],
) -> None:
    server, log = int8_server
    files, inputs, _ = held_out
    classifier = Classifier.from_checkpoint(trained_model.model_path, backend="onnx-int8")
    expected = [p.label for p in classifier.predict(inputs[:200])]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        ready = client.get("/ready").json()
        answers = []
        for start in range(0, 200, 50):
            batch = [
                ("image_file", (path.name, path.read_bytes(), "image/png"))
                for path in files[start : start + 50]
            ]
            reply = client.post("/api/v1/model/predict", files=batch)
            assert reply.status_code == 200, reply.text
            answers += [int(item["prediction"]) for item in reply.json()["data"]]
    assert ready["engine"] == "onnx-int8"
    assert answers == expected
    assert "loaded model.int8.onnx logged beside" in log.read_text()
