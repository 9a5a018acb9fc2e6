"""In-process benchmark: decode + forward images/s per backend, and predict latency at batch 1.

Usage: python -m benchmarks.run [--checkpoint PATH] [--data DIR] [--seconds S] [--threads N]
The HTTP load harness (wrk vs the seed baseline) is not written yet; see README benchmarks.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from digitflow.inference import Classifier
from digitflow.preprocess import bytes_to_input


def _find_checkpoint() -> Path:
    found = sorted(Path("mlruns").rglob("model.pt"))
    if not found:
        raise SystemExit("no checkpoint: pass --checkpoint or train one (digitflow train)")
    return found[0]


def _rate(fn: object, seconds: float) -> tuple[int, float, list[float]]:
    calls, start, lat = 0, time.perf_counter(), []
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        lat.append(time.perf_counter() - t)
        calls += 1
    return calls, time.perf_counter() - start, lat


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--data", type=Path, default=Path("data/mnist"))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    checkpoint = args.checkpoint or _find_checkpoint()
    with (args.data / "test.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    blobs = [(args.data / r["filepath"]).read_bytes() for r in rows[:64]]
    labels = [int(r["label"]) for r in rows]
    images = np.stack([bytes_to_input((args.data / r["filepath"]).read_bytes()) for r in rows])
    results = []
    for backend in ("torch", "onnx"):
        clf = Classifier.from_checkpoint(checkpoint, backend=backend, num_threads=args.threads)
        clf.warm_up()
        acc = float(
            np.mean([p.label == y for p, y in zip(clf.predict(images), labels, strict=True)])
        )

        def decode_forward(c: Classifier = clf) -> None:
            c.predict(np.stack([bytes_to_input(b) for b in blobs]))

        def forward64(c: Classifier = clf) -> None:
            c.predict(images[:64])

        def single(c: Classifier = clf) -> None:
            c.predict(images[:1])

        n, s, _ = _rate(decode_forward, args.seconds)
        n2, s2, _ = _rate(forward64, args.seconds)
        _, _, lat = _rate(single, args.seconds)
        results.append(
            {
                "backend": backend,
                "accuracy": acc,
                "decode_forward_images_per_s": 64 * n / s,
                "forward_only_images_per_s": 64 * n2 / s2,
                "batch1_p50_ms": 1000 * float(np.percentile(lat, 50)),
                "batch1_p99_ms": 1000 * float(np.percentile(lat, 99)),
            }
        )
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, threads={args.threads}")
    print("| backend | accuracy | decode+fwd img/s @64 | fwd img/s @64 | b1 p50 ms | b1 p99 ms |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['backend']} | {r['accuracy']:.3f} | {r['decode_forward_images_per_s']:.0f} |"
            f" {r['forward_only_images_per_s']:.0f} | {r['batch1_p50_ms']:.3f} |"
            f" {r['batch1_p99_ms']:.3f} |"
        )
    out = Path("benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"inprocess-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps({"threads": args.threads, "results": results}, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
