"""Request ids and the one JSON line per request, against the real gunicorn server's log."""

from __future__ import annotations

import base64
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.gunicorn_server import TrainedModel, serve
from tests.support.processes import ServerProcess

pytestmark = pytest.mark.slow  # starts real servers and trains a model

PREDICT = "/api/v1/model/predict"
GENERATED_ID = re.compile(r"[0-9a-f]{12}-[0-9a-f]+")


@pytest.fixture(scope="module")
def server(
    trained_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("request-log")
    yield from serve(folder / "gunicorn.log", trained_model, {"REQUEST_LOG": "true"})


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def digit(data_dir: Path) -> tuple[bytes, int]:
    path = sorted((data_dir / "test" / "7").glob("*.png"))[0]
    return path.read_bytes(), 7


def json_lines(server: ServerProcess) -> list[dict[str, Any]]:
    lines = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


def lines_of(server: ServerProcess, request_id: str, wait: bool = True) -> list[dict[str, Any]]:
    """The log lines stamped with `request_id` (waiting for the access line when `wait`)."""
    deadline = time.monotonic() + 15
    while True:
        found = [line for line in json_lines(server) if line.get("request_id") == request_id]
        done = any(line.get("logger") == "digitflow_fastapi.access" for line in found)
        if done or not wait or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def access_line(server: ServerProcess, request_id: str) -> dict[str, Any]:
    found = [
        line
        for line in lines_of(server, request_id)
        if line["logger"] == "digitflow_fastapi.access"
    ]
    assert len(found) == 1, f"{len(found)} access lines for {request_id}:\n{server.log()[-3000:]}"
    return found[0]


def test_a_client_request_id_is_echoed_and_its_line_has_the_images_predictions_and_model(
    server: ServerProcess,
    client: httpx.Client,
    digit: tuple[bytes, int],
    trained_model: TrainedModel,
) -> None:
    data, label = digit
    r = client.post(
        PREDICT,
        files={"image_file": ("seven.png", data)},
        headers={"X-Request-ID": "round-trip.1:a_B"},
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "round-trip.1:a_B"
    line = access_line(server, "round-trip.1:a_B")
    assert line["level"] == "INFO"
    assert (line["method"], line["path"], line["status"]) == ("POST", PREDICT, 200)
    assert line["images"] == 1 and line["predictions"] == [int(r.json()["data"][0]["prediction"])]
    assert line["predictions"] == [label]
    assert line["model_uuid"] == trained_model.run_id
    assert isinstance(line["latency_ms"], float) and line["latency_ms"] > 0
    assert line["pid"] != server.pid  # a worker's, not the master's
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}", line["time"])
    assert "seven.png" not in json.dumps(line)


def test_an_invalid_request_id_is_replaced_and_only_logged_escaped(
    server: ServerProcess, client: httpx.Client
) -> None:
    sent = 'not valid "id" ' + "x" * 300
    r = client.get("/api/v1/model/version", headers={"X-Request-ID": sent})
    made = r.headers["x-request-id"]
    assert r.status_code == 200 and GENERATED_ID.fullmatch(made)
    line = access_line(server, made)
    assert line["path"] == "/api/v1/model/version" and line["images"] == 0
    rejected = line["rejected_request_id"]
    assert rejected.startswith("not valid") and len(rejected) <= 210
    assert sent not in server.log()


def test_every_answer_carries_a_request_id_errors_included(
    server: ServerProcess, client: httpx.Client
) -> None:
    answers = [
        client.get("/no/such/page"),
        client.get("/health"),
        client.get("/docs"),
        client.post(PREDICT, content=b"x", headers={"Content-Type": "text/plain"}),
        client.post(PREDICT, files={"not_image_file": ("a.png", b"x")}),
        client.post("/invocations", content=b"{", headers={"Content-Type": "application/json"}),
    ]
    assert [a.status_code for a in answers] == [404, 200, 200, 415, 422, 400]
    ids = [a.headers["x-request-id"] for a in answers]
    assert all(GENERATED_ID.fullmatch(i) for i in ids) and len(set(ids)) == len(ids)
    assert access_line(server, ids[0])["status"] == 404
    assert access_line(server, ids[3])["status"] == 415


def test_every_line_logged_while_handling_a_request_carries_its_id(
    server: ServerProcess,
) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\n"
            b"X-Request-ID: gone-mid-upload\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 5000\r\n\r\n"
            b"--b\r\n"
        )
        time.sleep(0.5)
    lines = lines_of(server, "gone-mid-upload")
    messages = [line["message"] for line in lines]
    assert "client disconnected before the request was read" in messages, server.log()[-2000:]
    assert access_line(server, "gone-mid-upload")["status"] == 499


def test_the_other_predict_routes_log_their_image_count_and_predictions(
    server: ServerProcess, client: httpx.Client, digit: tuple[bytes, int]
) -> None:
    data, label = digit
    image = base64.b64encode(data).decode()
    r = client.post(
        "/invocations",
        json={"instances": [image, image]},
        headers={"X-Request-ID": "mlflow-two"},
    )
    assert r.status_code == 200
    assert access_line(server, "mlflow-two")["predictions"] == [label, label]
    v2 = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [image]}]}
    r = client.post("/v2/models/mnist/infer", json=v2, headers={"X-Request-ID": "oip-one"})
    assert r.status_code == 200
    line = access_line(server, "oip-one")
    assert line["images"] == 1 and line["predictions"] == [label]


def test_probes_and_scrapes_are_not_logged_at_the_default_level(
    server: ServerProcess, client: httpx.Client
) -> None:
    for path in ("/health", "/ready", "/metrics"):
        assert client.get(path, headers={"X-Request-ID": f"probe{path}"}).status_code == 200
    client.get("/openapi.json", headers={"X-Request-ID": "after-probes"})
    access_line(server, "after-probes")  # the lines before it are written by now
    for path in ("/health", "/ready", "/metrics"):
        assert lines_of(server, f"probe{path}", wait=False) == []


def test_by_default_no_request_lines_are_written_but_ids_are_still_echoed(
    trained_model: TrainedModel, tmp_path: Path, digit: tuple[bytes, int]
) -> None:
    for quiet in serve(tmp_path / "g.log", trained_model):
        r = httpx.post(
            quiet.url + PREDICT,
            files={"image_file": ("a.png", digit[0])},
            headers={"X-Request-ID": "quiet-1"},
            timeout=30,
        )
        assert r.status_code == 200 and r.headers["x-request-id"] == "quiet-1"
        time.sleep(0.5)
        assert [line for line in json_lines(quiet) if line.get("request_id")] == []
        assert any(line.get("message", "").startswith("model ready") for line in json_lines(quiet))
