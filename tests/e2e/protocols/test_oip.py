"""Open Inference Protocol v2 with Triton's own HTTP client against the real gunicorn server."""

from __future__ import annotations

import base64
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

from tests.support.gunicorn_server import TrainedModel, serve, worker_pids
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


def v1_answers(
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


def test_tritonclient_answers_match_the_v1_route_on_the_1000_held_out_test_pngs(
    client: triton.InferenceServerClient, server: ServerProcess, test_pngs: list[Path]
) -> None:
    assert len(test_pngs) == 1000
    want_labels, want_probabilities = v1_answers(server, test_pngs)
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


def test_repeated_output_names_are_refused_so_the_answer_stays_the_size_of_the_request(
    client: triton.InferenceServerClient, server: ServerProcess, test_pngs: list[Path]
) -> None:
    twice = [triton.InferRequestedOutput("probabilities") for _ in range(2)]
    with pytest.raises(InferenceServerException) as caught:
        client.infer("mnist", [bytes_input([test_pngs[0].read_bytes()])], outputs=twice)
    assert caught.value.status() == "400"
    assert "duplicate output 'probabilities'" in caught.value.message()
    # The review's request: 64 small PNGs and 20,000 copies of one output (0.5 MB) → 253 MB.
    images = [base64.b64encode(p.read_bytes()).decode() for p in test_pngs[:BATCH]]
    body = {
        "inputs": [{"name": "images", "datatype": "BYTES", "shape": [BATCH], "data": images}],
        "outputs": [{"name": "probabilities"}] * 20_000,
    }
    r = httpx.post(f"{server.url}/v2/models/mnist/infer", json=body, timeout=120)
    assert r.status_code == 400, r.text[:200]
    assert r.json() == {
        "error": "`outputs` names 20000 tensors; the model has 2: 'class' and 'probabilities', "
        "each at most once"
    }


@pytest.mark.parametrize("value", [b"\xb2", b"9" * 5000], ids=["superscript-two", "5000-digits"])
def test_an_inference_header_length_that_is_not_ascii_digits_is_a_400_not_a_500(
    server: ServerProcess, value: bytes
) -> None:
    header = b'{"inputs":[{"name":"images","datatype":"BYTES","shape":[1],"data":["aGk="]}]}'
    r = httpx.post(
        f"{server.url}/v2/models/mnist/infer",
        content=header,
        headers={b"Inference-Header-Content-Length": value},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    assert "Inference-Header-Content-Length is not a length" in r.json()["error"]


def test_tritonclient_gets_the_servers_reason_for_an_endpoint_it_does_not_have(
    client: triton.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_repository_index()
    assert caught.value.status() == "404"
    assert caught.value.message().startswith(
        "POST /v2/repository/index is not an endpoint of this server"
    )


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/v2/nothing/here", 404, None),
        ("POST", "/v2/repository/models/mnist/load", 404, None),
        ("DELETE", "/v2/models/mnist", 405, "GET"),
        ("GET", "/v2/models/mnist/infer", 405, "POST"),
        ("PUT", "/v2/models/mnist/versions/1/infer", 405, "POST"),
        ("POST", "/v2/health/live", 405, "GET"),
    ],
)
def test_every_unknown_path_or_method_under_v2_answers_the_protocols_error(
    server: ServerProcess, method: str, path: str, status: int, allow: str | None
) -> None:
    r = httpx.request(method, f"{server.url}{path}", timeout=30)
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"]
    assert f"{method} " in r.json()["error"] and path in r.json()["error"]
    assert r.headers.get("allow") == allow


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_a_json_header_of_many_tiny_values_is_refused_before_it_is_parsed(
    server: ServerProcess, test_pngs: list[Path]
) -> None:
    url = f"{server.url}/v2/models/mnist/infer"
    # The largest legitimate JSON request still passes: 64 images as nested `pixels` numbers.
    pixels = np.stack([np.asarray(Image.open(p), dtype=np.float32) / 255.0 for p in test_pngs])
    nested = pixels[:BATCH].reshape(BATCH, 1, 28, 28).tolist()
    tensor = {"name": "pixels", "datatype": "FP32", "shape": [BATCH, 1, 28, 28], "data": nested}
    r = httpx.post(url, json={"inputs": [tensor]}, timeout=120)
    assert r.status_code == 200, r.text[:200]
    # 10 MiB of `[{},...]` parsed to +241 MiB in a worker; now it is counted and refused.
    flood = b"[" + b"{}," * (10 * 1024 * 1024 // 3 - 10) + b"{}]"
    workers = worker_pids(server.pid)
    can_reset_peak = True
    for pid in workers:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        except OSError:
            can_reset_peak = False
    before = {pid: _status_kib(pid, "VmRSS") for pid in workers}
    r = httpx.post(url, content=flood, timeout=120)
    assert r.status_code == 413, r.text[:200]
    assert "more than 53120 values (MAX_JSON_VALUES)" in r.json()["error"]
    if can_reset_peak:
        grown_mib = max(_status_kib(pid, "VmHWM") - before[pid] for pid in workers) / 1024
        assert grown_mib < 64, f"a worker's peak RSS grew {grown_mib:.0f} MiB"
