"""One request path: every route of the app's table is behind the edge but the named open ones,
with and without a root path, over real HTTP (uvicorn `--root-path`, and the seed's gunicorn)."""

from __future__ import annotations

import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.routing import _IncludedRouter
from starlette.routing import BaseRoute, Mount

from digitflow_fastapi.app import create_app
from digitflow_fastapi.config import Settings
from digitflow_fastapi.edge.routing import OPEN_ROUTES
from tests.support.gunicorn_server import SRC_DIR, TrainedModel, serve
from tests.support.processes import (
    ServerProcess,
    free_port,
    start_process,
    stop_process,
    wait_for_http,
)

pytestmark = pytest.mark.slow  # starts real servers

KEY = "one-path-key-0123456789abcdef"
ROOT = "/digitflow"
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _declared_routes(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, set[str]]]:
    """(path template, methods) of every route the app serves, included routers flattened."""
    for route in routes:
        if isinstance(route, _IncludedRouter):
            for candidate in route.effective_candidates():
                effective = getattr(candidate, "starlette_route", None) or candidate
                original = getattr(candidate, "original_route", candidate)
                path = getattr(effective, "path", "") or getattr(original, "path", "")
                methods = getattr(original, "methods", None) or set()
                yield path, set(methods)
        elif isinstance(route, Mount):
            yield route.path + "/any-file", {"GET", "HEAD"}
        else:
            yield getattr(route, "path", ""), set(getattr(route, "methods", None) or ())


def _concrete(template: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", template)


def _is_open(template: str) -> bool:
    mount = template.removesuffix("/any-file")
    return template in OPEN_ROUTES or (mount != template and mount in OPEN_ROUTES)


ROUTES = sorted(_declared_routes(create_app(Settings()).router.routes))


def test_the_walk_covers_every_kind_of_route() -> None:
    paths = {path for path, _ in ROUTES}
    for expected in (
        "/api/v1/model/predict",
        "/api/v1/model/version",
        "/v2/models/{name}/versions/{version}/infer",
        "/invocations",
        "/metrics",
        "/health",
        "/static/any-file",
    ):
        assert expected in paths
    assert len(ROUTES) >= 20


def start_uvicorn(
    log_path: Path, env: dict[str, str], root_path: str | None = None
) -> ServerProcess:
    """Plain `uvicorn digitflow_fastapi.main:APP`, from `src/`, on a free port of 127.0.0.1."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "digitflow_fastapi.main:APP"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    if root_path is not None:
        command += ["--root-path", root_path]
    return start_process(command, log_path, f"http://127.0.0.1:{port}", env=env, cwd=SRC_DIR)


def _model_env(model: TrainedModel) -> dict[str, str]:
    return {"PRED_MODEL_PATH": str(model.model_path), "PRED_MODEL_UUID": model.run_id}


@pytest.fixture(scope="module", params=["no root path", "root path"])
def keyed_server(
    request: pytest.FixtureRequest,
    trained_model: TrainedModel,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, str | None]]:
    root = ROOT if request.param == "root path" else None
    env = {**_model_env(trained_model), "API_KEYS": KEY, "RATE_LIMIT": "1000/minute"}
    log = tmp_path_factory.mktemp("one-path") / "uvicorn.log"
    server = start_uvicorn(log, env, root)
    try:
        wait_for_http(server, "/ready", timeout=120)
        yield server, root
    finally:
        stop_process(server)


def test_every_route_but_the_open_ones_answers_401_without_a_key_with_every_method(
    keyed_server: tuple[ServerProcess, str | None],
) -> None:
    server, _ = keyed_server
    wrong = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for template, methods in ROUTES:
            path = _concrete(template)
            for method in METHODS:
                answer = client.request(method, path)
                served_openly = _is_open(template) and (method in methods or "/any-file" in path)
                if served_openly and answer.status_code == 401:
                    wrong.append(f"{method} {path}: open route answered 401")
                if not served_openly and answer.status_code != 401:
                    wrong.append(f"{method} {path}: {answer.status_code} without a key")
                elif not served_openly and answer.headers.get("www-authenticate") != "Bearer":
                    wrong.append(f"{method} {path}: 401 without WWW-Authenticate")
    assert not wrong, "\n".join(wrong)


def test_paths_sent_with_the_root_path_prefix_are_keyed_too(
    keyed_server: tuple[ServerProcess, str | None],
) -> None:
    server, root = keyed_server
    if root is None:
        pytest.skip("no root path on this server")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for path in ("/api/v1/model/version", "/metrics", "/v2/models/mnist", "/invocations"):
            assert client.get(root + path).status_code == 401, path
            assert client.post(root + path).status_code == 401, path


def test_under_a_root_path_the_model_routes_answer_with_a_key_and_the_probes_without(
    keyed_server: tuple[ServerProcess, str | None], trained_model: TrainedModel, data_dir: Path
) -> None:
    server, _ = keyed_server
    png = sorted((data_dir / "test" / "7").glob("*.png"))[0].read_bytes()
    keyed = {"X-API-Key": KEY}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        version = client.get("/api/v1/model/version", headers=keyed)
        assert version.json() == {"data": {"model_uuid": trained_model.run_id}}
        predicted = client.post(
            "/api/v1/model/predict", files={"image_file": ("a.png", png)}, headers=keyed
        )
        assert predicted.status_code == 200, predicted.text
        assert predicted.json()["data"][0]["prediction"] == "7"
        metadata = client.get("/v2/models/mnist", headers=keyed)
        assert metadata.status_code == 200 and metadata.json()["name"] == "mnist"
        assert client.get("/metrics", headers=keyed).status_code == 200
        for probe in ("/health", "/ready", "/v2/health/ready", "/docs", "/openapi.json", "/"):
            answer = client.get(probe)
            assert answer.status_code == 200, (probe, answer.status_code)
            assert answer.headers["x-request-id"]


def _half_sent(port: int, path: str, declared: int = 100_000) -> socket.socket:
    """A connection that sent the headers and a first piece of the body, then waits."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    if path.endswith("/predict"):
        content_type, start = "multipart/form-data; boundary=b", b"--b\r\n"
    else:
        content_type, start = "application/json", b'{"inputs": ['
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    sock.sendall(head.encode() + start)
    return sock


def _answer_of(sock: socket.socket, wait: float) -> bytes:
    sock.settimeout(wait)
    try:
        return sock.recv(65536)
    except TimeoutError:
        return b""


@pytest.fixture(scope="module")
def two_in_flight(
    trained_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = {"MAX_IN_FLIGHT_PER_WORKER": "2", "REQUEST_LOG": "true"}
    log = tmp_path_factory.mktemp("in-flight") / "gunicorn.log"
    yield from serve(log, trained_model, env, workers=1)


def _until_nothing_in_flight(server: ServerProcess) -> None:
    """Until the earlier tests' connections are gone (a keyed GET counts against the cap too)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if httpx.get(f"{server.url}/api/v1/model/version", timeout=10).status_code == 200:
            time.sleep(0.5)  # and the second slot
            return
        time.sleep(0.2)
    raise AssertionError("the in-flight slots were not freed")


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/mnist/infer",
        "/v2/models/mnist/versions/{uuid}/infer",
        "/invocations",
        "/api/v1/model/predict",
    ],
)
def test_the_in_flight_cap_refuses_the_third_half_sent_request_on_every_model_route(
    two_in_flight: ServerProcess, trained_model: TrainedModel, path: str
) -> None:
    path = path.format(uuid=trained_model.run_id)
    port = int(two_in_flight.url.rsplit(":", 1)[1])
    _until_nothing_in_flight(two_in_flight)
    socks = [_half_sent(port, path) for _ in range(8)]
    try:
        answers = [_answer_of(sock, 3.0 if i < 2 else 10.0) for i, sock in enumerate(socks)]
    finally:
        for sock in socks:
            sock.close()
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    assert len(refused) == 6, [a[:40] for a in answers]
    assert all(b"MAX_IN_FLIGHT_PER_WORKER" in a for a in refused)
    assert answers[0] == b"" and answers[1] == b""  # still reading their bodies


def test_a_client_leaving_mid_upload_on_the_versioned_infer_route_logs_no_traceback(
    two_in_flight: ServerProcess, trained_model: TrainedModel
) -> None:
    port = int(two_in_flight.url.rsplit(":", 1)[1])
    path = f"/v2/models/mnist/versions/{trained_model.run_id}/infer"
    _until_nothing_in_flight(two_in_flight)
    _half_sent(port, path).close()
    deadline = time.monotonic() + 10
    while "client disconnected" not in two_in_flight.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = two_in_flight.log()
    assert "client disconnected before the request was read" in log
    assert "Traceback" not in log
    assert httpx.get(f"{two_in_flight.url}/health", timeout=10).status_code == 200
