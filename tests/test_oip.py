"""Open Inference Protocol v2 with Triton's own HTTP client against the real gunicorn server."""

from __future__ import annotations

import csv
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.support.gunicorn_server import TrainedModel, serve
from tests.support.processes import ServerProcess

PREDICT = "/api/v1/model/predict"

pytestmark = pytest.mark.slow  # starts a real server and trains a model
BATCH = 64


@pytest.fixture(scope="module")
def server(
    trained_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    yield from serve(tmp_path_factory.mktemp("oip") / "gunicorn.log", trained_model)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120.0)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def test_pngs(data_dir: Path) -> list[Path]:
    with (data_dir / "test.csv").open() as f:
        return [data_dir / row["filepath"] for row in csv.DictReader(f)]


def bytes_input(blobs: list[bytes], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("images", [len(blobs)], "BYTES")
    tensor.set_data_from_numpy(np.array(blobs, dtype=np.object_), binary_data=binary)
    return tensor


def pixels_input(paths: list[Path], binary: bool = True) -> triton.InferInput:
    pixels = np.stack([np.asarray(Image.open(p), dtype=np.float32) / 255.0 for p in paths])
    pixels = pixels.reshape(-1, 1, 28, 28).astype(np.float32)
    tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    return tensor


def seed_answers(
    server: ServerProcess, paths: list[Path]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Labels and probabilities from the seed route, 64 files per request."""
    labels: list[int] = []
    probabilities: list[list[float]] = []
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for start in range(0, len(paths), BATCH):
            chunk = paths[start : start + BATCH]
            files = [("image_file", (p.name, p.read_bytes(), "image/png")) for p in chunk]
            r = http.post(PREDICT, params={"probabilities": "true"}, files=files)
            assert r.status_code == 200, r.text
            for item in r.json()["data"]:
                labels.append(int(item["prediction"]))
                probabilities.append(item["probabilities"])
    return np.array(labels), np.array(probabilities, dtype=np.float32)


def test_tritonclient_sees_a_live_ready_server_with_the_mnist_model_at_the_run_version(
    client: triton.InferenceServerClient, trained_model: TrainedModel
) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mnist")
    assert client.is_model_ready("mnist", model_version=trained_model.run_id)
    assert not client.is_model_ready("resnet")
    server = client.get_server_metadata()
    assert server["name"] == "digitflow" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("mnist")
    assert meta["name"] == "mnist"
    assert meta["versions"] == [trained_model.run_id]
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]}
    assert inputs == {"pixels": ("FP32", [-1, 1, 28, 28]), "images": ("BYTES", [-1])}
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]}
    assert outputs == {"class": ("INT64", [-1]), "probabilities": ("FP32", [-1, 10])}


def test_tritonclient_answers_match_the_seed_route_on_the_1000_held_out_test_pngs(
    client: triton.InferenceServerClient, server: ServerProcess, test_pngs: list[Path]
) -> None:
    assert len(test_pngs) == 1000
    want_labels, want_probabilities = seed_answers(server, test_pngs)
    for kind in ("images", "pixels"):
        labels, probabilities = [], []
        for start in range(0, len(test_pngs), BATCH):
            chunk = test_pngs[start : start + BATCH]
            if kind == "images":
                tensor = bytes_input([p.read_bytes() for p in chunk])
            else:
                tensor = pixels_input(chunk)
            result = client.infer("mnist", [tensor])
            labels.append(result.as_numpy("class"))
            probabilities.append(result.as_numpy("probabilities"))
        got_labels = np.concatenate(labels)
        got_probabilities = np.concatenate(probabilities)
        assert got_labels.dtype == np.int64 and got_probabilities.shape == (1000, 10)
        np.testing.assert_array_equal(got_labels, want_labels, err_msg=kind)
        np.testing.assert_allclose(got_probabilities, want_probabilities, atol=1e-5, err_msg=kind)


def test_json_tensors_and_binary_tensors_give_the_same_answer(
    client: triton.InferenceServerClient, test_pngs: list[Path]
) -> None:
    chunk = test_pngs[:8]
    answers = []
    for binary in (True, False):
        outputs = [
            triton.InferRequestedOutput("class", binary_data=binary),
            triton.InferRequestedOutput("probabilities", binary_data=binary),
        ]
        result = client.infer("mnist", [pixels_input(chunk, binary)], outputs=outputs)
        answers.append((result.as_numpy("class"), result.as_numpy("probabilities")))
    np.testing.assert_array_equal(answers[0][0], answers[1][0])
    np.testing.assert_allclose(answers[0][1], answers[1][1], atol=1e-6)


def test_only_the_requested_output_is_returned_and_the_request_id_echoed(
    client: triton.InferenceServerClient, trained_model: TrainedModel, test_pngs: list[Path]
) -> None:
    result = client.infer(
        "mnist",
        [bytes_input([test_pngs[0].read_bytes()])],
        outputs=[triton.InferRequestedOutput("class")],
        request_id="req-7",
    )
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["class"]
    assert response["id"] == "req-7"
    assert response["model_version"] == trained_model.run_id
    assert result.as_numpy("probabilities") is None


def test_an_unknown_model_is_a_404_error_the_client_reports(
    client: triton.InferenceServerClient, test_pngs: list[Path]
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer("resnet", [bytes_input([test_pngs[0].read_bytes()])])
    assert caught.value.status() == "404"
    assert "unknown model 'resnet'" in caught.value.message()


def test_a_text_file_as_an_image_is_a_400_naming_the_element(
    client: triton.InferenceServerClient, test_pngs: list[Path]
) -> None:
    blobs = [test_pngs[0].read_bytes(), b"just some notes\n"]
    with pytest.raises(InferenceServerException) as caught:
        client.infer("mnist", [bytes_input(blobs)])
    assert caught.value.status() == "400"
    assert "input 'images'[1]" in caught.value.message()
    assert "not a supported image" in caught.value.message()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"inputs": []}, "send exactly one input"),
        (
            {"inputs": [{"name": "tensor", "datatype": "FP32", "shape": [1, 1, 28, 28]}]},
            "unknown input 'tensor'",
        ),
        (
            {"inputs": [{"name": "pixels", "datatype": "INT8", "shape": [1, 1, 28, 28]}]},
            "expected 'FP32'",
        ),
        (
            {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 28, 28], "data": []}]},
            "is not [N,1,28,28]",
        ),
        (
            {
                "inputs": [
                    {"name": "pixels", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.5]}
                ]
            },
            "1 values in `data` for a shape of 784",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "FP32",
                        "shape": [1, 1, 28, 28],
                        "data": [255.0] * 784,
                    }
                ]
            },
            "values must be in [0, 1]",
        ),
        (
            {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]},
            "not valid base64",
        ),
        (
            {
                "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}],
                "outputs": [{"name": "logits"}],
            },
            "unknown output 'logits'",
        ),
    ],
)
def test_malformed_requests_get_400_with_an_error_naming_the_problem(
    server: ServerProcess, body: dict[str, object], expected: str
) -> None:
    r = httpx.post(f"{server.url}/v2/models/mnist/infer", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert list(r.json()) == ["error"]
    assert expected in r.json()["error"]


def test_invalid_json_and_a_lying_binary_header_get_400_not_500(server: ServerProcess) -> None:
    url = f"{server.url}/v2/models/mnist/infer"
    r = httpx.post(url, content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    header = (
        b'{"inputs":[{"name":"images","datatype":"BYTES","shape":[1],'
        b'"parameters":{"binary_data_size":8}}]}'
    )
    lying = header + struct.pack("<I", 4000) + b"abcd"  # an element longer than the body
    r = httpx.post(
        url,
        content=lying,
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=30,
    )
    assert r.status_code == 400 and "past the end" in r.json()["error"]
    r = httpx.post(url, content=header, headers={"Inference-Header-Content-Length": "999"})
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]


def test_more_images_than_the_request_limit_are_refused_before_decoding(
    server: ServerProcess,
) -> None:
    body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [65], "data": ["x"] * 65}]}
    r = httpx.post(f"{server.url}/v2/models/mnist/infer", json=body, timeout=30)
    assert r.status_code == 413
    assert "at most 64" in r.json()["error"]


def test_the_v2_routes_are_documented_with_examples(server: ServerProcess) -> None:
    spec = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    for path in (
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{name}",
        "/v2/models/{name}/ready",
        "/v2/models/{name}/infer",
    ):
        assert path in spec["paths"], path
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]
    examples = infer["requestBody"]["content"]["application/json"]["examples"]
    assert {"images", "pixels"} <= set(examples)
    assert "example" in infer["responses"]["200"]["content"]["application/json"]
    assert {"400", "404"} <= set(infer["responses"])
