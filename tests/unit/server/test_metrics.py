"""Metrics: bucket semantics, the text format, and adding up the workers' snapshots."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from digitflow_fastapi import metrics


def _line(text: str, prefix: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(prefix))


def test_buckets_are_cumulative_with_le_bounds(tmp_path: Path) -> None:
    worker = metrics.WorkerMetrics()
    for seconds in (0.001, 0.0015, 3.0):  # 0.001 belongs to le="0.001" (bound included)
        worker.observe_request(200, seconds)
    text = metrics.render(tmp_path, own=worker)
    name = "digitflow_predict_latency_seconds"
    assert _line(text, f'{name}_bucket{{le="0.001"}}').endswith(" 1")
    assert _line(text, f'{name}_bucket{{le="0.002"}}').endswith(" 2")
    assert _line(text, f'{name}_bucket{{le="2.0"}}').endswith(" 2")
    assert _line(text, f'{name}_bucket{{le="+Inf"}}').endswith(" 3")
    assert _line(text, f"{name}_count").endswith(" 3")


def test_snapshots_of_all_workers_are_added_up(tmp_path: Path) -> None:
    for pid, count in ((11, 3), (12, 4)):
        worker = metrics.WorkerMetrics()
        for _ in range(count):
            worker.observe_request(200, 0.01)
        worker.images = count * 2
        (tmp_path / f"worker-{pid}.json").write_text(json.dumps(worker.snapshot()))
    (tmp_path / "worker-13.json").write_text("{not json")  # a torn file is skipped
    text = metrics.render(tmp_path, own=metrics.WorkerMetrics())
    assert 'digitflow_predict_requests_total{status="200"} 7' in text
    assert "digitflow_predicted_images_total 14" in text


def test_a_fifo_in_the_metrics_folder_does_not_block_a_scrape(tmp_path: Path) -> None:
    worker = metrics.WorkerMetrics()
    worker.observe_request(200, 0.01)
    (tmp_path / "worker-21.json").write_text(json.dumps(worker.snapshot()))
    os.mkfifo(tmp_path / "worker-22.json")  # a reader would wait for a writer forever
    result: list[str] = []
    scrape = threading.Thread(
        target=lambda: result.append(metrics.render(tmp_path, own=metrics.WorkerMetrics())),
        daemon=True,
    )
    scrape.start()
    scrape.join(timeout=10)
    assert result, "the scrape blocked on the FIFO"
    assert 'digitflow_predict_requests_total{status="200"} 1' in result[0]
