"""Backpressure over real HTTP: a full batch queue answers 503 at once, a late answer 504."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.gunicorn_server import TrainedModel, serve
from tests.support.processes import ServerProcess

pytestmark = pytest.mark.slow  # starts real servers

PREDICT = "/api/v1/model/predict"


def _digits(data_dir: Path, count: int, step: int = 1) -> list[tuple[str, tuple[str, bytes]]]:
    paths = sorted((data_dir / "test").glob("*/*.png"))[::step][:count]
    return [("image_file", (p.name, p.read_bytes())) for p in paths]


def _burst(
    url: str, path: str, requests: int, concurrency: int, **kwargs: object
) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        gate = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:

            async def one() -> httpx.Response:
                async with gate:
                    return await client.post(path, **kwargs)  # type: ignore[arg-type]

            return list(await asyncio.gather(*(one() for _ in range(requests))))

    return asyncio.run(run())


def _status_count(metrics_text: str, status: int) -> int:
    for line in metrics_text.splitlines():
        if line.startswith(f'digitflow_predict_requests_total{{status="{status}"}}'):
            return int(line.split()[-1])
    return 0


def _scrape_until(url: str, caught_up: Callable[[str], bool], timeout: float = 10.0) -> str:
    """`/metrics` once every worker's snapshot (rewritten each second) includes the requests."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        if caught_up(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


@pytest.fixture
def tight_queue(trained_model: TrainedModel, tmp_path: Path) -> Iterator[ServerProcess]:
    yield from serve(tmp_path / "g.log", trained_model, {"MAX_QUEUED_IMAGES_PER_WORKER": "1"})


@pytest.fixture
def tight_deadline(trained_model: TrainedModel, tmp_path: Path) -> Iterator[ServerProcess]:
    yield from serve(tmp_path / "g.log", trained_model, {"REQUEST_TIMEOUT_MS": "1"})


def test_a_full_batch_queue_answers_503_with_retry_after_and_the_rest_are_answered(
    tight_queue: ServerProcess, data_dir: Path
) -> None:
    files = _digits(data_dir, 16)
    answers = _burst(tight_queue.url, PREDICT, 120, 32, files=files)
    statuses = [a.status_code for a in answers]
    refused = [a for a in answers if a.status_code == 503]
    assert set(statuses) <= {200, 503}, statuses
    assert refused and statuses.count(200) > 0
    for answer in refused:
        assert answer.headers["retry-after"] == "1"
        assert "MAX_QUEUED_IMAGES_PER_WORKER" in answer.json()["detail"]
    assert all(len(a.json()["data"]) == 16 for a in answers if a.status_code == 200)
    assert httpx.get(f"{tight_queue.url}/health", timeout=10).status_code == 200
    scraped = _scrape_until(tight_queue.url, lambda t: _status_count(t, 503) >= len(refused))
    assert _status_count(scraped, 503) >= len(refused)
    assert "digitflow_queue_wait_seconds_count" in scraped


def test_a_request_unanswered_past_request_timeout_ms_gets_504_on_every_protocol(
    tight_deadline: ServerProcess, data_dir: Path
) -> None:
    files = _digits(data_dir, 64)
    answers = _burst(tight_deadline.url, PREDICT, 24, 8, files=files)
    late = [a for a in answers if a.status_code == 504]
    assert {a.status_code for a in answers} <= {200, 504}
    assert late, "64 images in 1 ms: some request must have missed its deadline"
    assert all("REQUEST_TIMEOUT_MS" in a.json()["detail"] for a in late)
    tensor = {
        "inputs": [
            {
                "name": "pixels",
                "shape": [64, 1, 28, 28],
                "datatype": "FP32",
                "data": [0.0] * 64 * 784,
            }
        ]
    }
    oip = _burst(tight_deadline.url, "/v2/models/mnist/infer", 16, 8, json=tensor)
    assert {a.status_code for a in oip} <= {200, 504} and 504 in {a.status_code for a in oip}
    assert all("REQUEST_TIMEOUT_MS" in a.json()["error"] for a in oip if a.status_code == 504)
    scraped = _scrape_until(tight_deadline.url, lambda t: _status_count(t, 504) >= len(late))
    assert _status_count(scraped, 504) >= len(late)
    assert httpx.get(f"{tight_deadline.url}/health", timeout=10).status_code == 200


@pytest.fixture
def server(trained_model: TrainedModel, tmp_path: Path) -> Iterator[ServerProcess]:
    yield from serve(tmp_path / "g.log", trained_model)


def test_predictions_by_digit_are_counted_in_metrics(server: ServerProcess, data_dir: Path) -> None:
    files = _digits(data_dir, 20, step=50)  # every digit
    answer = httpx.post(f"{server.url}{PREDICT}", files=files, timeout=30).json()["data"]
    labels = [item["prediction"] for item in answer]
    scraped = _scrape_until(server.url, lambda t: f'digit="{labels[0]}"}} 0' not in t)
    counted = {
        line.split('"')[1]: int(line.split()[-1])
        for line in scraped.splitlines()
        if line.startswith("digitflow_predictions_total{")
    }
    assert counted == {str(d): labels.count(str(d)) for d in range(10)}
    assert len(set(labels)) > 5
