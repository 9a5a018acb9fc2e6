"""The REST API over HTTP against the seed's gunicorn command (uvicorn workers, 127.0.0.1)."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from digitflow.inference.classifier import Classifier
from digitflow.inference.preprocess import bytes_to_input
from tests.support.gunicorn_server import TrainedModel, serve
from tests.support.processes import ServerProcess

pytestmark = pytest.mark.slow  # starts real servers or trains a model

PREDICT = "/api/v1/model/predict"
MAX_FILES = 4
MAX_UPLOAD = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def server(
    trained_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("api") / "gunicorn.log"
    env = {
        "MAX_FILES_PER_REQUEST": str(MAX_FILES),
        "MAX_IMAGE_PIXELS": "1000000",
        "MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
    }
    yield from serve(log, trained_model, env)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def test_rows(data_dir: Path) -> list[tuple[Path, int]]:
    with (data_dir / "test.csv").open() as f:
        return [(data_dir / r["filepath"], int(r["label"])) for r in csv.DictReader(f)]


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def image_bytes(fmt: str, size: tuple[int, int] = (40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 255).save(buf, format=fmt)
    return buf.getvalue()


def assert_still_answers(client: httpx.Client, sample: Path) -> None:
    r = client.post(PREDICT, files={"image_file": ("digit.png", sample.read_bytes(), "image/png")})
    assert r.status_code == 200
    assert r.json()["data"][0]["image_filename"] == "digit.png"


def test_a_v1_predict_request_gets_the_documented_response_shape(
    client: httpx.Client, test_rows: list[tuple[Path, int]]
) -> None:
    path, _ = test_rows[0]
    r = client.post(PREDICT, files={"image_file": ("digit.png", path.read_bytes(), "image/png")})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert list(body) == ["data"]
    assert len(body["data"]) == 1
    assert set(body["data"][0]) == {"image_filename", "prediction"}
    assert body["data"][0]["image_filename"] == "digit.png"
    assert isinstance(body["data"][0]["prediction"], str)
    assert body["data"][0]["prediction"] in [str(d) for d in range(10)]


def test_several_files_are_answered_in_order(
    client: httpx.Client, test_rows: list[tuple[Path, int]]
) -> None:
    chosen = test_rows[:3]
    files = [
        ("image_file", (f"f{i}.png", p.read_bytes(), "image/png"))
        for i, (p, _) in enumerate(chosen)
    ]
    r = client.post(PREDICT, files=files)
    assert r.status_code == 200
    assert [d["image_filename"] for d in r.json()["data"]] == ["f0.png", "f1.png", "f2.png"]


def test_probabilities_are_added_only_when_asked(
    client: httpx.Client, test_rows: list[tuple[Path, int]]
) -> None:
    data = test_rows[0][0].read_bytes()
    r = client.post(
        PREDICT, params={"probabilities": "true"}, files={"image_file": ("a.png", data)}
    )
    item = r.json()["data"][0]
    assert len(item["probabilities"]) == 10
    assert abs(sum(item["probabilities"]) - 1.0) < 1e-3
    assert int(item["prediction"]) == int(np.argmax(item["probabilities"]))
    off = client.post(
        PREDICT, params={"probabilities": "false"}, files={"image_file": ("a.png", data)}
    )
    assert off.json() == {"data": [{"image_filename": "a.png", "prediction": item["prediction"]}]}


def test_a_probabilities_value_that_is_not_a_boolean_gets_422(
    client: httpx.Client, test_rows: list[tuple[Path, int]]
) -> None:
    data = test_rows[0][0].read_bytes()
    r = client.post(PREDICT, params={"probabilities": "maybe"}, files={"image_file": ("a", data)})
    assert r.status_code == 422
    assert "probabilities" in r.json()["detail"]


def test_version_reports_the_model_uuid(client: httpx.Client, trained_model: TrainedModel) -> None:
    r = client.get("/api/v1/model/version")
    assert r.status_code == 200
    assert r.json() == {"data": {"model_uuid": trained_model.run_id}}


def test_health_is_ok_and_ready_reports_the_golden_check(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] is True
    assert body["warmed_up"] is True
    assert body["golden_checked"] == 20


def test_docs_and_redoc_describe_the_endpoints_with_schemas_and_errors(
    client: httpx.Client,
) -> None:
    assert client.get("/docs").status_code == 200
    assert client.get("/redoc").status_code == 200
    spec = client.get("/openapi.json").json()
    post = spec["paths"][PREDICT]["post"]
    assert "image_file" in json.dumps(post["requestBody"])
    assert {"200", "400", "413", "415", "422"} <= set(post["responses"])
    assert "/api/v1/model/version" in spec["paths"]
    example = post["responses"]["200"]["content"]["application/json"]["example"]
    assert example == {"data": [{"image_filename": "digit.png", "prediction": "7"}]}


@pytest.mark.parametrize(("page", "rendered_marker"), [("/docs", "opblock"), ("/redoc", "redoc")])
def test_the_docs_pages_render_offline_in_a_headless_browser(
    server: ServerProcess, tmp_path: Path, page: str, rendered_marker: str
) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    html = httpx.get(server.url + page, timeout=30).text
    assert "http://" not in html.replace(server.url, "") and "https://" not in html  # no CDN
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=15000",
            "--dump-dom",
            server.url + page,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = result.stdout
    # The DOM after the page's JavaScript ran lists the endpoints it read from /openapi.json.
    assert rendered_marker in dom, result.stderr[-2000:]
    assert PREDICT in dom and "/api/v1/model/version" in dom


BAD_FORMATS = {
    "tiff": image_bytes("TIFF"),
    "pdf": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n",
    "psd": b"8BPS\x00\x01" + b"\x00" * 40,
    "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
}


@pytest.mark.parametrize("kind", sorted(BAD_FORMATS))
def test_formats_off_the_allow_list_get_415_and_the_worker_keeps_answering(
    client: httpx.Client, test_rows: list[tuple[Path, int]], kind: str
) -> None:
    r = client.post(PREDICT, files={"image_file": (f"x.{kind}", BAD_FORMATS[kind])})
    assert r.status_code == 415
    assert "image_file" in r.json()["detail"]
    assert_still_answers(client, test_rows[0][0])


def _truncated_png(sample: Path) -> bytes:
    return sample.read_bytes()[:60]


def _bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (3000, 3000), 255).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("case", "status", "words"),
    [
        ("text", 415, "not a supported image"),
        ("truncated", 400, "image_file #1"),
        ("empty", 400, "file is empty"),
        ("bomb", 413, "pixels"),
    ],
)
def test_bad_files_get_a_4xx_that_names_the_problem_and_the_worker_keeps_answering(
    client: httpx.Client, test_rows: list[tuple[Path, int]], case: str, status: int, words: str
) -> None:
    sample = test_rows[0][0]
    payload = {
        "text": b"hello, I am not an image\n",
        "truncated": _truncated_png(sample),
        "empty": b"",
        "bomb": _bomb_png(),
    }[case]
    r = client.post(PREDICT, files={"image_file": ("bad.png", payload, "image/png")})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert_still_answers(client, sample)


def test_a_wrong_field_name_or_none_gets_422(
    client: httpx.Client, test_rows: list[tuple[Path, int]]
) -> None:
    sample = test_rows[0][0]
    r = client.post(PREDICT, files={"image": ("digit.png", sample.read_bytes())})
    assert r.status_code == 422
    assert "image_file" in r.json()["detail"] and "'image'" in r.json()["detail"]
    r = client.post(PREDICT, data={"x": "1"}, files={"other": ("a", b"")})
    assert r.status_code == 422
    assert_still_answers(client, sample)


def test_a_wrong_content_type_gets_415(
    client: httpx.Client, test_rows: list[tuple[Path, int]]
) -> None:
    r = client.post(PREDICT, json={"image_file": "digit.png"})
    assert r.status_code == 415
    assert "multipart/form-data" in r.json()["detail"]
    r = client.post(PREDICT)
    assert r.status_code == 415
    assert_still_answers(client, test_rows[0][0])


def test_more_files_than_allowed_get_413(
    client: httpx.Client, test_rows: list[tuple[Path, int]]
) -> None:
    data = test_rows[0][0].read_bytes()
    files = [("image_file", (f"{i}.png", data)) for i in range(MAX_FILES + 1)]
    r = client.post(PREDICT, files=files)
    assert r.status_code == 413
    assert str(MAX_FILES) in r.json()["detail"]
    assert_still_answers(client, test_rows[0][0])


def test_a_body_over_the_limit_is_refused_from_its_content_length(
    client: httpx.Client, server: ServerProcess, test_rows: list[tuple[Path, int]]
) -> None:
    # Declares a huge body but sends only a few bytes: an answer proves it was not read.
    host, port = server.url.removeprefix("http://").split(":")
    import socket

    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 1000000000\r\n\r\n--b\r\n"
        )
        # The server closes after answering; read to the end (head and body may be separate).
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        answer = b"".join(chunks).decode("latin-1")
    assert answer.startswith("HTTP/1.1 413")
    assert "MAX_UPLOAD_BYTES" in answer
    assert_still_answers(client, test_rows[0][0])


def test_a_chunked_body_over_the_limit_is_refused(
    client: httpx.Client, test_rows: list[tuple[Path, int]]
) -> None:
    def body() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="image_file"; filename="a.png"\r\n\r\n'
        for _ in range(MAX_UPLOAD // 65536 + 2):
            yield b"\x00" * 65536

    r = client.post(
        PREDICT, content=body(), headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert r.status_code == 413
    assert "MAX_UPLOAD_BYTES" in r.json()["detail"]
    assert_still_answers(client, test_rows[0][0])


def test_the_same_image_always_gets_the_same_answer(
    client: httpx.Client, test_rows: list[tuple[Path, int]]
) -> None:
    data = test_rows[5][0].read_bytes()
    answers = {
        json.dumps(
            client.post(
                PREDICT, params={"probabilities": "1"}, files={"image_file": ("a.png", data)}
            ).json()
        )
        for _ in range(8)
    }
    assert len(answers) == 1


def test_server_cli_and_in_process_model_agree_on_all_test_images(
    client: httpx.Client,
    trained_model: TrainedModel,
    test_rows: list[tuple[Path, int]],
    data_dir: Path,
    tmp_path: Path,
) -> None:
    classifier = Classifier.from_checkpoint(trained_model.model_path)
    batch = np.stack([bytes_to_input(p.read_bytes()) for p, _ in test_rows])
    in_process = [str(p.label) for p in classifier.predict(batch)]

    served: list[str] = []
    for start in range(0, len(test_rows), MAX_FILES):
        chunk = test_rows[start : start + MAX_FILES]
        files = [("image_file", (p.name, p.read_bytes(), "image/png")) for p, _ in chunk]
        r = client.post(PREDICT, files=files)
        assert r.status_code == 200
        served.extend(d["prediction"] for d in r.json()["data"])

    out = tmp_path / "preds.jsonl"
    cli = Path(sys.executable).parent / "digitflow"
    subprocess.run(
        [
            str(cli),
            "predict",
            str(data_dir / "test"),
            "--model-path",
            str(trained_model.model_path),
            "--output",
            str(out),
            "--no-progress",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    by_path = {}
    for line in out.read_text().splitlines():
        row = json.loads(line)
        assert set(row) == {"time", "image_filepath", "prediction"}
        by_path[Path(row["image_filepath"]).resolve()] = row["prediction"]
    from_cli = [by_path[p.resolve()] for p, _ in test_rows]

    assert len(in_process) == 1000
    assert served == in_process
    assert from_cli == in_process
    accuracy = np.mean(
        [int(a) == label for a, (_, label) in zip(in_process, test_rows, strict=True)]
    )
    assert accuracy > 0.9


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_metrics_count_every_workers_requests_by_status(
    client: httpx.Client, test_rows: list[tuple[Path, int]]
) -> None:
    ok = 'digitflow_predict_requests_total{status="200"}'
    refused = 'digitflow_predict_requests_total{status="415"}'
    before = client.get("/metrics").text
    data = test_rows[0][0].read_bytes()
    for _ in range(12):  # new connections: the kernel spreads them over both workers
        httpx.post(client.base_url.join(PREDICT), files={"image_file": ("a.png", data)}, timeout=30)
    client.post(PREDICT, files={"image_file": ("a.pdf", BAD_FORMATS["pdf"])})
    deadline = time.monotonic() + 10
    while True:  # other workers publish their snapshot every second
        after = client.get("/metrics")
        if _metric(after.text, ok) - _metric(before, ok) >= 12 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert after.headers["content-type"].startswith("text/plain")
    assert _metric(after.text, ok) - _metric(before, ok) == 12
    assert _metric(after.text, refused) - _metric(before, refused) == 1
    images = "digitflow_predicted_images_total"
    assert _metric(after.text, images) - _metric(before, images) == 12
    assert 'digitflow_predict_latency_seconds_bucket{le="+Inf"}' in after.text
