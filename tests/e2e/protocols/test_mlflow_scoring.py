"""MLflow's scoring protocol with MLflow's own scoring-server client against real gunicorn."""

from __future__ import annotations

import base64
import csv
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pandas as pd
import pytest
from mlflow.deployments import PredictionsResponse
from mlflow.pyfunc.scoring_server.client import ScoringServerClient
from PIL import Image

from tests.support.gunicorn_server import TrainedModel, serve
from tests.support.processes import ServerProcess

PREDICT = "/api/v1/model/predict"

pytestmark = pytest.mark.slow  # starts a real server and trains a model


@pytest.fixture(scope="module")
def server(
    trained_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    yield from serve(tmp_path_factory.mktemp("mlflow-scoring") / "gunicorn.log", trained_model)


@pytest.fixture(scope="module")
def scoring(server: ServerProcess) -> ScoringServerClient:
    url = urlparse(server.url)
    return ScoringServerClient(url.hostname, url.port)


@pytest.fixture(scope="module")
def rows(data_dir: Path) -> list[tuple[Path, int]]:
    with (data_dir / "test.csv").open() as f:
        return [(data_dir / r["filepath"], int(r["label"])) for r in csv.DictReader(f)][:32]


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def v1_labels(server: ServerProcess, paths: list[Path]) -> list[int]:
    files = [("image_file", (p.name, p.read_bytes(), "image/png")) for p in paths]
    r = httpx.post(server.url + PREDICT, files=files, timeout=60)
    assert r.status_code == 200, r.text
    return [int(item["prediction"]) for item in r.json()["data"]]


def labels_of(response: PredictionsResponse) -> list[int]:
    frame = response.get_predictions()
    assert list(frame.columns) == ["prediction", "probabilities"]
    assert all(len(p) == 10 and abs(sum(p) - 1) < 1e-4 for p in frame["probabilities"])
    return [int(v) for v in frame["prediction"]]


def test_mlflows_client_sees_the_server_ready_and_reads_its_version(
    scoring: ScoringServerClient,
) -> None:
    scoring.wait_server_ready(timeout=30)
    scoring.ping()
    assert scoring.get_version() == "0.1.0"


def test_a_dataframe_with_a_column_of_base64_images_matches_the_v1_route(
    scoring: ScoringServerClient, server: ServerProcess, rows: list[tuple[Path, int]]
) -> None:
    paths = [p for p, _ in rows]
    frame = pd.DataFrame({"image": [b64(p) for p in paths]})
    assert labels_of(scoring.invoke(frame)) == v1_labels(server, paths)


def test_inputs_as_a_pixel_array_and_as_base64_strings_match_the_v1_route(
    scoring: ScoringServerClient, server: ServerProcess, rows: list[tuple[Path, int]]
) -> None:
    paths = [p for p, _ in rows]
    want = v1_labels(server, paths)
    pixels = np.stack([np.asarray(Image.open(p), dtype=np.float32) / 255.0 for p in paths])
    assert labels_of(scoring.invoke(pixels)) == want
    assert labels_of(scoring.invoke(pixels.reshape(len(paths), 784))) == want
    assert labels_of(scoring.invoke([b64(p) for p in paths])) == want


def test_instances_with_b64_objects_match_the_v1_route(
    server: ServerProcess, rows: list[tuple[Path, int]]
) -> None:
    paths = [p for p, _ in rows[:8]]
    body = {"instances": [{"b64": b64(p)} for p in paths]}
    r = httpx.post(server.url + "/invocations", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = [item["prediction"] for item in r.json()["predictions"]]
    assert got == v1_labels(server, paths)


def test_a_text_file_in_a_dataframe_is_a_4xx_naming_the_row(
    scoring: ScoringServerClient, rows: list[tuple[Path, int]]
) -> None:
    notes = base64.b64encode(b"shopping list: milk\n").decode()
    frame = pd.DataFrame({"image": [b64(rows[0][0]), notes]})
    with pytest.raises(Exception, match=r"error code 415") as caught:
        scoring.invoke(frame)
    assert "dataframe_split[1]: not a supported image" in str(caught.value)


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        (b"{oops", 400, "not valid JSON"),
        (b'{"columns": ["image"]}', 400, "send exactly one of"),
        (b'{"inputs": ["@@@"]}', 400, "inputs[0]: not valid base64"),
        (b'{"inputs": [[1, 2, 3]]}', 400, "is not [N,28,28], [N,1,28,28] or [N,784]"),
        (b'{"inputs": [1, "aGk="]}', 400, "mixes base64 images and pixel arrays"),
        (b'{"dataframe_split": {"columns": ["a", "b"], "data": [["x", "y"]]}}', 400, "one column"),
        (b'{"inputs": []}', 400, "no images in the request"),
    ],
)
def test_bad_requests_get_a_4xx_with_mlflows_error_fields_and_a_detail(
    server: ServerProcess, body: bytes, status: int, expected: str
) -> None:
    r = httpx.post(
        server.url + "/invocations",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == status, r.text
    answer = r.json()
    assert answer["error_code"] == "BAD_REQUEST"
    assert expected in answer["message"] and answer["detail"] == answer["message"]


def test_csv_bodies_are_refused_with_415_naming_the_content_type(server: ServerProcess) -> None:
    r = httpx.post(
        server.url + "/invocations",
        content=b"image\nabc\n",
        headers={"Content-Type": "text/csv"},
        timeout=30,
    )
    assert r.status_code == 415
    assert "application/json" in r.json()["detail"]


def test_the_scoring_routes_are_documented_with_examples(server: ServerProcess) -> None:
    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    assert {"/ping", "/version", "/invocations"} <= set(spec["paths"])
    post = spec["paths"]["/invocations"]["post"]
    examples = post["requestBody"]["content"]["application/json"]["examples"]
    assert {"dataframe_split", "instances", "inputs"} <= set(examples)
    assert "example" in post["responses"]["200"]["content"]["application/json"]
