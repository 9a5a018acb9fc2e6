"""The tracking client against tiny real HTTP servers on 127.0.0.1 that answer what an attacker
(or a misconfigured registry) would: redirects to another host, run ids that are paths."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from digitflow.artifacts.refs import resolve_model
from digitflow.artifacts.run_layout import MANIFEST_NAME
from digitflow.artifacts.tracking import PROBE_PATH, probe_server
from digitflow.errors import RunNotFound
from digitflow.settings import StoreConfig

Answer = Callable[[BaseHTTPRequestHandler], None]


class _Server:
    """A threaded HTTP server whose every GET is answered by `answer`; records what it saw."""

    def __init__(self, answer: Answer) -> None:
        seen: list[tuple[str, str | None]] = []
        self.seen = seen

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append((self.path, self.headers.get("Authorization")))
                answer(self)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers() -> Iterator[Callable[[Answer], _Server]]:
    started: list[_Server] = []

    def start(answer: Answer) -> _Server:
        started.append(_Server(answer))
        return started[-1]

    yield start
    for server in started:
        server.close()


def _json(handler: BaseHTTPRequestHandler, body: object) -> None:
    data = json.dumps(body).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _redirect_to(target: str) -> Answer:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", target + handler.path)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return answer


def test_probe_credentials_are_not_sent_on_to_a_server_on_another_origin(
    servers: Callable[[Answer], _Server],
) -> None:
    elsewhere = servers(lambda handler: _json(handler, {}))
    tracking = servers(_redirect_to(elsewhere.url))
    probe_server(tracking.url, "ann", "s3cret", timeout=5.0)
    assert tracking.seen[0][1] is not None and tracking.seen[0][1].startswith("Basic ")
    assert [path for path, _ in elsewhere.seen] == [PROBE_PATH]  # the redirect was followed
    assert elsewhere.seen[0][1] is None


def test_probe_credentials_follow_a_redirect_on_the_same_origin(
    servers: Callable[[Answer], _Server],
) -> None:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        if handler.path.startswith("/moved"):
            _json(handler, {})
        else:
            _redirect_to("/moved")(handler)

    tracking = servers(answer)
    probe_server(tracking.url, "ann", "s3cret", timeout=5.0)
    assert len(tracking.seen) == 2
    assert tracking.seen[0][1] == tracking.seen[1][1] and tracking.seen[1][1] is not None


def _pulled_run_elsewhere(folder: Path) -> Path:
    """A folder that looks like an intact pulled run (model and manifest), outside models/."""
    model = folder / "artifacts" / "model" / "model.pt"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"planted model")
    entry = {
        "path": "model/model.pt",
        "size": model.stat().st_size,
        "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
    }
    (folder / MANIFEST_NAME).write_text(json.dumps({"run_id": "x", "files": [entry]}))
    return model


def test_a_registry_run_id_that_is_a_path_is_refused_before_any_folder_is_built(
    servers: Callable[[Answer], _Server], tmp_path: Path
) -> None:
    planted = _pulled_run_elsewhere(tmp_path / "elsewhere")

    def answer(handler: BaseHTTPRequestHandler) -> None:
        if "/registered-models/alias" in handler.path:
            version = {"name": "mnist", "version": "1", "run_id": str(tmp_path / "elsewhere")}
            _json(handler, {"model_version": version})
        else:
            _json(handler, {})

    registry = servers(answer)
    store = StoreConfig(tracking_uri=registry.url, timeout=5.0)
    models_dir = tmp_path / "models"
    with pytest.raises(RunNotFound, match="not a run UUID"):
        resolved = resolve_model("models:/mnist@champion", models_dir, store)
        assert resolved.model_path != planted  # what happened before: the planted file served
    assert any("/registered-models/alias" in path for path, _ in registry.seen)
    assert not models_dir.exists()
