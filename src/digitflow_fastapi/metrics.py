"""Prometheus metrics for the predict path, served at `GET /metrics` for all workers at once.

The hot path only bumps integers in this process (about a microsecond; prometheus_client's
multiprocess mode, which writes a memory-mapped file on every update, measured 5 % fewer
requests/s at c=64). Each worker writes a JSON snapshot of its totals to `DIGITFLOW_METRICS_DIR`
every second (atomically), and the worker that answers a scrape adds up every snapshot, its own
fresh one included. `src/gunicorn.conf.py` sets that folder up; under plain uvicorn the process's
own totals are served. Snapshots of exited workers stay, so counters never go backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digitflow.atomic import write_text_atomically

if TYPE_CHECKING:
    from digitflow.inference.classifier import Prediction

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
WAIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
CLASSES = 10
HISTOGRAMS = ("latency", "batch", "queue_wait")


class Histogram:
    """Counts per bucket (`le` semantics) plus the sum of observed values."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class ModelMetrics:
    """Which model this worker serves, and the service's swap counts as this worker last saw
    them (`swaps`: the generation it serves; `refused`: from the state folder)."""

    def __init__(self) -> None:
        self.uuid: str | None = None  # None until a model is loaded
        self.generation = 0
        self.swaps = 0
        self.refused = 0
        self.load_failures = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "generation": self.generation,
            "swaps": self.swaps,
            "refused": self.refused,
            "load_failures": self.load_failures,
        }


class WorkerMetrics:
    """This process's totals."""

    def __init__(self) -> None:
        self.model = ModelMetrics()
        self.requests: Counter[str] = Counter()
        self.images = 0
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch = Histogram(BATCH_BUCKETS)
        self.queue_wait = Histogram(WAIT_BUCKETS)
        self.classes = [0] * CLASSES
        self.edge_refused: Counter[str] = Counter()  # by the edge, before any endpoint: 401/403/429

    def observe_request(self, status: int, seconds: float) -> None:
        self.requests[str(status)] += 1
        self.latency.observe(seconds)

    def observe_refusal(self, status: int) -> None:
        self.edge_refused[str(status)] += 1

    def observe_batch(self, images: int) -> None:
        self.batch.observe(images)

    def observe_queue_wait(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    def observe_predictions(self, predictions: Sequence[Prediction]) -> None:
        self.images += len(predictions)
        classes = self.classes
        for prediction in predictions:
            classes[prediction.label] += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "images": self.images,
            "latency": {"counts": self.latency.counts, "sum": self.latency.sum},
            "batch": {"counts": self.batch.counts, "sum": self.batch.sum},
            "queue_wait": {"counts": self.queue_wait.counts, "sum": self.queue_wait.sum},
            "classes": self.classes,
            "model": self.model.snapshot(),
            "edge_refused": dict(self.edge_refused),
        }


METRICS = WorkerMetrics()


def _snapshot_path(folder: Path) -> Path:
    return folder / f"worker-{os.getpid()}.json"


def write_snapshot(folder: Path, own: WorkerMetrics = METRICS) -> None:
    """Replace this worker's snapshot file atomically (no fsync: it is rewritten every second)."""
    write_text_atomically(_snapshot_path(folder), json.dumps(own.snapshot()), durable=False)


async def publish_forever(folder: Path, every_s: float = 1.0) -> None:
    """Write this worker's snapshot every `every_s` seconds until cancelled (then once more)."""
    try:
        while True:
            write_snapshot(folder)
            await asyncio.sleep(every_s)
    finally:
        with contextlib.suppress(OSError):
            write_snapshot(folder)


def _add(total: dict[str, Any], part: dict[str, Any]) -> None:
    for status, count in part.get("requests", {}).items():
        total["requests"][status] = total["requests"].get(status, 0) + int(count)
    total["images"] += int(part.get("images", 0))
    for status, count in part.get("edge_refused", {}).items():
        total["edge_refused"][status] = total["edge_refused"].get(status, 0) + int(count)
    classes = part.get("classes", [])
    if len(classes) == CLASSES:
        total["classes"] = [a + int(b) for a, b in zip(total["classes"], classes, strict=True)]
    for name in HISTOGRAMS:
        counts = part.get(name, {}).get("counts", [])
        mine = total[name]["counts"]
        if len(counts) == len(mine):
            total[name]["counts"] = [a + int(b) for a, b in zip(mine, counts, strict=True)]
            total[name]["sum"] += float(part[name].get("sum", 0.0))


def collect(folder: Path | None, own: WorkerMetrics = METRICS) -> dict[str, Any]:
    """Totals over every worker's snapshot in `folder` (this worker's, `own`, refreshed first)."""
    if folder is None:
        total = own.snapshot()
        _add_model(total, total["model"], live=True)
        return total
    write_snapshot(folder, own)
    total = WorkerMetrics().snapshot()
    live_since = time.time() - LIVE_SNAPSHOT_S
    for path in folder.glob("worker-*.json"):
        with contextlib.suppress(OSError, ValueError):
            snapshot = _read_regular_file(path)
            if snapshot is not None:
                part = json.loads(snapshot)
                _add(total, part)
                _add_model(total, part.get("model", {}), path.stat().st_mtime >= live_since)
    return total


LIVE_SNAPSHOT_S = 5.0  # a worker rewrites its snapshot every second; older ones have exited


def _add_model(total: dict[str, Any], part: dict[str, Any], live: bool) -> None:
    """Served uuids by live worker; the service's swap counts (the highest any worker saw)."""
    served: dict[str, int] = total.setdefault("model_info", {})
    if live and part.get("uuid") is not None:
        served[str(part["uuid"])] = served.get(str(part["uuid"]), 0) + 1
    mine = total["model"]
    for key in ("swaps", "refused"):
        mine[key] = max(int(mine.get(key, 0)), int(part.get(key, 0)))
    if part is not mine:
        mine["load_failures"] = int(mine.get("load_failures", 0)) + int(
            part.get("load_failures", 0)
        )


def _read_regular_file(path: Path) -> bytes | None:
    """The file's bytes; None for anything but a regular file (a FIFO would block the scrape)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            return None
        return handle.read(1 << 20)


def _histogram_lines(name: str, bounds: tuple[float, ...], data: dict[str, Any]) -> list[str]:
    lines, running = [], 0
    for bound, count in zip((*bounds, float("inf")), data["counts"], strict=True):
        running += count
        le = "+Inf" if bound == float("inf") else repr(float(bound))
        lines.append(f'{name}_bucket{{le="{le}"}} {running}')
    lines += [f"{name}_sum {data['sum']!r}", f"{name}_count {running}"]
    return lines


def _model_lines(total: dict[str, Any]) -> list[str]:
    model = total["model"]
    lines = [
        "# HELP digitflow_model_info Workers serving each model (by model uuid).",
        "# TYPE digitflow_model_info gauge",
    ]
    for uuid, workers in sorted(total.get("model_info", {}).items()):
        label = uuid.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        lines.append(f'digitflow_model_info{{model_uuid="{label}"}} {workers}')
    return [
        *lines,
        "# HELP digitflow_model_swaps_total Model swaps published (SIGHUP or a moved alias).",
        "# TYPE digitflow_model_swaps_total counter",
        f"digitflow_model_swaps_total {model['swaps']}",
        "# HELP digitflow_model_swaps_refused_total Swaps refused: failed to load or self-test.",
        "# TYPE digitflow_model_swaps_refused_total counter",
        f"digitflow_model_swaps_refused_total {model['refused']}",
        "# HELP digitflow_model_worker_load_failures_total Published models a worker could not "
        "load (it kept the old one).",
        "# TYPE digitflow_model_worker_load_failures_total counter",
        f"digitflow_model_worker_load_failures_total {model['load_failures']}",
    ]


def render(folder: Path | None, own: WorkerMetrics = METRICS) -> str:
    """Prometheus text exposition of the totals."""
    total = collect(folder, own)
    lines = [
        "# HELP digitflow_predict_requests_total Predict requests answered, by HTTP status.",
        "# TYPE digitflow_predict_requests_total counter",
    ]
    for status, count in sorted(total["requests"].items()):
        lines.append(f'digitflow_predict_requests_total{{status="{status}"}} {count}')
    lines += [
        "# HELP digitflow_predicted_images_total Images predicted.",
        "# TYPE digitflow_predicted_images_total counter",
        f"digitflow_predicted_images_total {total['images']}",
        "# HELP digitflow_predict_latency_seconds Server-side time to answer a predict request.",
        "# TYPE digitflow_predict_latency_seconds histogram",
        *_histogram_lines("digitflow_predict_latency_seconds", LATENCY_BUCKETS, total["latency"]),
        "# HELP digitflow_batch_images Images per forward pass (micro-batching).",
        "# TYPE digitflow_batch_images histogram",
        *_histogram_lines("digitflow_batch_images", BATCH_BUCKETS, total["batch"]),
        "# HELP digitflow_queue_wait_seconds Time a request waited in the batch queue.",
        "# TYPE digitflow_queue_wait_seconds histogram",
        *_histogram_lines("digitflow_queue_wait_seconds", WAIT_BUCKETS, total["queue_wait"]),
        "# HELP digitflow_predictions_total Images predicted, by predicted digit.",
        "# TYPE digitflow_predictions_total counter",
        *(
            f'digitflow_predictions_total{{digit="{digit}"}} {count}'
            for digit, count in enumerate(total["classes"])
        ),
        *_model_lines(total),
        "# HELP digitflow_refused_requests_total Requests refused at the edge (401, 403, 429), "
        "any route, by HTTP status.",
        "# TYPE digitflow_refused_requests_total counter",
    ]
    for status, count in sorted(total["edge_refused"].items()):
        lines.append(f'digitflow_refused_requests_total{{status="{status}"}} {count}')
    return "\n".join(lines) + "\n"
