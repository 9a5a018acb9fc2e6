"""The per-worker budget for request-body bytes (`body_budget`), over real HTTP against the
seed's gunicorn command with one worker, and the budget's own bookkeeping."""

from __future__ import annotations

import asyncio
import json
import selectors
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from digitflow_fastapi.config import Settings
from digitflow_fastapi.edge.body_budget import BodyBudget, Message, metered
from digitflow_fastapi.errors import RequestError
from tests.support.gunicorn_server import TrainedModel, serve, worker_pids
from tests.support.processes import ServerProcess

MIB = 1024 * 1024
UPLOAD_CAP = 2 * MIB
BUDGET = 8 * MIB
PREDICT = "/api/v1/model/predict"
CONNECTIONS = 40  # unbounded, they would hold 80 MiB of bodies

pytestmark = pytest.mark.slow  # starts a real server and trains a model


@pytest.fixture(scope="module")
def server(
    trained_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = {
        "MAX_UPLOAD_BYTES": str(UPLOAD_CAP),
        "MAX_BUFFERED_BODY_BYTES_PER_WORKER": str(BUDGET),
        "BODY_TIMEOUT_S": "120",
    }
    log = tmp_path_factory.mktemp("budget") / "gunicorn.log"
    yield from serve(log, trained_model, env, workers=1)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def part_head(name: str, filename: str) -> bytes:
    return (
        f'--b\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


def held_upload(server: ServerProcess) -> socket.socket:
    """A connection that sends a cap-sized multipart upload but its last byte."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = part_head("image_file", "x.png")
    sock.sendall(
        f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: {UPLOAD_CAP}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\n\r\n".encode()
        + head
        + b"a" * (UPLOAD_CAP - len(head) - 1)
    )
    return sock


def answers(socks: list[socket.socket], settle: float) -> dict[socket.socket, bytes]:
    """What each connection has received, once nothing new arrived for `settle` seconds."""
    received: dict[socket.socket, bytes] = {}
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        while events := selector.select(timeout=settle):
            for key, _ in events:
                sock = key.fileobj  # type: ignore[assignment]
                chunk = sock.recv(65536)
                received[sock] = received.get(sock, b"") + chunk
                if not chunk or received[sock].endswith(b"}"):
                    selector.unregister(sock)
    return received


def test_bodies_past_the_worker_budget_get_503_and_memory_stays_bounded(
    server: ServerProcess, data_dir: Path
) -> None:
    [worker] = worker_pids(server.pid)
    sample = next((data_dir / "test" / "4").glob("*.png")).read_bytes()
    assert httpx.post(server.url + PREDICT, files={"image_file": ("4.png", sample)}).is_success
    rss_before = rss_bytes(worker)
    socks = [held_upload(server) for _ in range(CONNECTIONS)]
    try:
        received = answers(socks, settle=3.0)
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        rss_held = rss_bytes(worker)
        refused = list(received.values())
    finally:
        for sock in socks:
            sock.close()
    # A refusal needs the others to hold the rest of the budget: 3 or 4 uploads stay held.
    assert CONNECTIONS - 4 <= len(refused) <= CONNECTIONS - 3, len(refused)
    for raw in refused:
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), raw[:300]
        assert b"retry-after: 1" in head.lower()
        assert "MAX_BUFFERED_BODY_BYTES_PER_WORKER" in json.loads(body)["detail"]
    growth = rss_held - rss_before
    print(f"{CONNECTIONS} held uploads of {UPLOAD_CAP} bytes: worker RSS +{growth / MIB:.1f} MiB")
    assert growth < 40 * MIB  # the bodies alone were 80 MiB before the budget
    # Once they are gone the budget is whole again: uploads near the cap go through, one after
    # another (a leak of one held body would refuse the fifth). The worker notices the closed
    # connections asynchronously: until it has, a refusal is expected.
    padding = b"p" * (UPLOAD_CAP - len(sample) - 1024)
    files = {"image_file": ("4.png", sample), "padding": ("pad.bin", padding)}
    deadline = time.monotonic() + 30
    while (answer := httpx.post(server.url + PREDICT, files=files, timeout=30)).status_code == 503:
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.2)
    for _ in range(6):
        answer = httpx.post(server.url + PREDICT, files=files, timeout=30)
        assert answer.status_code == 200, answer.text
    assert worker_pids(server.pid) == [worker]


def test_a_budget_smaller_than_one_upload_is_refused_at_start_up() -> None:
    with pytest.raises(ValueError, match="MAX_BUFFERED_BODY_BYTES_PER_WORKER"):
        Settings(MAX_UPLOAD_BYTES=2 * MIB, MAX_BUFFERED_BODY_BYTES_PER_WORKER=MIB)


def body_messages(*sizes: int) -> list[Message]:
    return [
        {"type": "http.request", "body": b"x" * size, "more_body": i < len(sizes) - 1}
        for i, size in enumerate(sizes)
    ]


def test_metered_receive_charges_each_chunk_and_releases_all_at_the_end() -> None:
    budget = BodyBudget(100)

    async def scenario() -> None:
        queue = body_messages(30, 30)

        async def receive() -> Message:
            return queue.pop(0)

        with metered(receive, budget) as charged_receive:
            await charged_receive()
            assert budget.used == 30
            await charged_receive()
            assert budget.used == 60
        assert budget.used == 0

    asyncio.run(scenario())


def test_a_chunk_past_the_budget_raises_503_and_the_rest_is_released() -> None:
    budget = BodyBudget(100)
    budget.charge(50)  # another request holds half

    async def scenario() -> None:
        queue = body_messages(40, 40)

        async def receive() -> Message:
            return queue.pop(0)

        with metered(receive, budget) as charged_receive:
            await charged_receive()
            with pytest.raises(RequestError) as refused:
                await charged_receive()
        assert refused.value.status_code == 503
        assert refused.value.headers == {"Retry-After": "1"}
        assert budget.used == 50

    asyncio.run(scenario())
