"""In-process limits: decode + forward images/s at batch 64 and one-image latency per backend,
and the ceiling a server's throughput is read against.

`ceiling` runs decode + preprocess + forward on the benchmark's PNGs in as many processes as the
server has workers (one intra-op thread each, ONNX Runtime, batches of 64): what this machine can
do with no HTTP, no multipart, no per-request Python.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from digitflow.inference.classifier import Classifier
from digitflow.inference.preprocess import bytes_to_input

BACKENDS = ("torch", "onnx", "onnx-int8")
CEILING_ENGINES = ("onnx", "onnx-int8")


def _rate(fn: Callable[[], object], seconds: float) -> tuple[int, float, list[float]]:
    calls, start, latencies = 0, time.perf_counter(), []
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        latencies.append(time.perf_counter() - t)
        calls += 1
    return calls, time.perf_counter() - start, latencies


def measure_backend(
    checkpoint: Path, samples: Sequence[tuple[bytes, int]], backend: str, seconds: float
) -> dict[str, Any]:
    """Accuracy on `samples` and the throughput/latency figures for one backend, one thread."""
    classifier = Classifier.from_checkpoint(checkpoint, backend=backend, num_threads=1)
    classifier.warm_up()
    images = np.stack([bytes_to_input(data) for data, _ in samples])
    labels = [label for _, label in samples]
    predicted = [p.label for p in classifier.predict(images)]
    blobs = [data for data, _ in samples[:64]]

    def decode_forward() -> None:
        classifier.predict(np.stack([bytes_to_input(b) for b in blobs]))

    n_decode, s_decode, _ = _rate(decode_forward, seconds)
    n_forward, s_forward, _ = _rate(lambda: classifier.predict(images[:64]), seconds)
    _, _, single = _rate(lambda: classifier.predict(images[:1]), seconds)
    return {
        "backend": backend,
        "accuracy": float(np.mean([p == y for p, y in zip(predicted, labels, strict=True)])),
        "predictions": predicted,
        "decode_forward_images_per_s": 64 * n_decode / s_decode,
        "forward_only_images_per_s": 64 * n_forward / s_forward,
        "batch1_p50_ms": 1000 * float(np.percentile(single, 50)),
        "batch1_p99_ms": 1000 * float(np.percentile(single, 99)),
    }


def measure_all(
    checkpoint: Path, samples: Sequence[tuple[bytes, int]], seconds: float
) -> list[dict[str, Any]]:
    """`measure_backend` for every backend; also checks that their predictions agree."""
    results = [measure_backend(checkpoint, samples, b, seconds) for b in BACKENDS]
    reference = results[0]["predictions"]
    for result in results:
        result["same_predictions_as_torch"] = result.pop("predictions") == reference
    return results


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """Markdown table of `measure_all`'s results."""
    lines = [
        "| backend | accuracy | same answers as torch | decode+fwd img/s @64 | fwd img/s @64 "
        "| 1 image p50 ms | 1 image p99 ms |",
        "|---|---:|:---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['backend']} | {r['accuracy']:.3f} "
            f"| {'yes' if r['same_predictions_as_torch'] else 'NO'} "
            f"| {r['decode_forward_images_per_s']:,.0f} | {r['forward_only_images_per_s']:,.0f} "
            f"| {r['batch1_p50_ms']:.3f} | {r['batch1_p99_ms']:.3f} |"
        )
    return "\n".join(lines)


def _ceiling_worker(
    checkpoint: Path, blobs: list[bytes], seconds: float, start: Any, engine: str
) -> tuple[int, float]:
    """One worker's share of the ceiling: images done and seconds taken."""
    classifier = Classifier.from_checkpoint(checkpoint, backend=engine, num_threads=1)
    classifier.warm_up()
    batches = [blobs[i : i + 64] for i in range(0, len(blobs) - 63, 64)]
    start.wait()
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        for batch in batches:
            classifier.predict(np.stack([bytes_to_input(b) for b in batch]))
            done += len(batch)
    return done, time.perf_counter() - began


def ceiling(
    checkpoint: Path,
    samples: Sequence[tuple[bytes, int]],
    workers: int,
    seconds: float,
    engine: str = "onnx",
) -> float:
    """Images/s of decode + preprocess + forward in `workers` processes at once, on `engine`'s
    graph (`onnx` or `onnx-int8`)."""
    blobs = [data for data, _ in samples]
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        start = manager.Barrier(workers + 1)
        with context.Pool(workers) as pool:
            pending = [
                pool.apply_async(_ceiling_worker, (checkpoint, blobs, seconds, start, engine))
                for _ in range(workers)
            ]
            start.wait()
            results = [p.get(timeout=seconds * 10 + 120) for p in pending]
    return sum(done for done, _ in results) / max(elapsed for _, elapsed in results)
