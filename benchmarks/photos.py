"""Photo and drawing accuracy per condition, from the HELD-OUT split only (never training images).

    python -m benchmarks.photos build OUT [--per-condition 300] [--drawn 300]
    python -m benchmarks.photos score OUT [--checkpoint PATH]
    python -m benchmarks.photos speed [--side 4000x3000] [--repeat 30]

`build` renders, deterministically (seed 2026), every held-out digit cycled through each photo
condition of `digitflow.data.photo_synth.CONDITIONS` (paper fills the frame, table visible, ruled or
squared lines, blue ink, defocus blur, small digit in a big frame) as 480×640 portrait JPEGs
(small digit: 1200×1600), plus drawn digits (thick strokes, transparent 280×280 canvas, PNG), and
writes them as files with `labels.csv`. `score` reads only those files and the checkpoint (default:
the default model), so an older checkout of digitflow can score the same set for a before/after.
`speed` times preprocessing of one 12-megapixel phone JPEG. `png-speed --before FILE` times the
held-out MNIST PNGs through this checkout's `bytes_to_input` and through another checkout's
`preprocess.py` (e.g. main's), interleaved in one process, so the two share the machine's load.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from digitflow import paths
from digitflow.inference.classifier import Classifier
from digitflow.inference.preprocess import bytes_to_input

SEED = 2026
DRAWN = "drawn"


def held_out_digits(data_dir: Path) -> list[tuple[np.ndarray, int]]:
    """The held-out (test split) MNIST digits as 28×28 uint8 arrays, with labels."""
    with (data_dir / "test.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    digits = []
    for row in rows:
        with Image.open(data_dir / row["filepath"]) as image:
            digits.append((np.asarray(image.convert("L"), dtype=np.uint8), int(row["label"])))
    return digits


def build(out: Path, data_dir: Path, per_condition: int, drawn: int) -> None:
    """Render the benchmark set into `out` (files + labels.csv)."""
    from digitflow.data.photo_synth import CONDITIONS, render_drawing, render_photo

    digits = held_out_digits(data_dir)
    rng = np.random.default_rng(SEED)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, condition in enumerate(CONDITIONS):
        for i in range(per_condition):
            digit, label = digits[(i * 7 + c * 131) % len(digits)]
            name = f"{condition}/{i:04d}.jpg"
            (out / condition).mkdir(exist_ok=True)
            (out / name).write_bytes(render_photo(digit, condition, rng))
            rows.append((name, condition, label))
    (out / DRAWN).mkdir(exist_ok=True)
    for i in range(drawn):
        digit, label = digits[(i * 3 + 17) % len(digits)]
        name = f"{DRAWN}/{i:04d}.png"
        (out / name).write_bytes(render_drawing(digit, rng))
        rows.append((name, DRAWN, label))
    with (out / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("file", "condition", "label"))
        writer.writerows(rows)
    print(f"wrote {len(rows)} images to {out}")


def score(out: Path, checkpoint: Path) -> dict[str, float]:
    """Accuracy per condition of `checkpoint` on the set in `out` (through `bytes_to_input`)."""
    with (out / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    inputs = np.stack([bytes_to_input((out / r["file"]).read_bytes()) for r in rows])
    predictions = Classifier.from_checkpoint(checkpoint).predict(inputs)
    right: dict[str, list[bool]] = defaultdict(list)
    for row, prediction in zip(rows, predictions, strict=True):
        right[row["condition"]].append(prediction.label == int(row["label"]))
        if row["condition"] != DRAWN:
            right["all photos"].append(prediction.label == int(row["label"]))
    return {name: float(np.mean(hits)) for name, hits in right.items()}


def phone_jpeg(width: int, height: int) -> bytes:
    """A phone-sized JPEG of a held-out-like digit on paper (rendered at full size)."""
    from digitflow.data.photo_synth import render_photo

    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[4:24, 12:16] = 255
    digit[4:8, 8:16] = 255
    return render_photo(digit, "paper", np.random.default_rng(SEED), frame=(width, height))


def speed(width: int, height: int, repeat: int) -> dict[str, float]:
    """Median and worst milliseconds to preprocess one `width`×`height` JPEG."""
    data = phone_jpeg(width, height)
    bytes_to_input(data)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        bytes_to_input(data)
        times.append(1000 * (time.perf_counter() - started))
    return {"bytes": len(data), "median_ms": float(np.median(times)), "max_ms": max(times)}


def png_speed(data_dir: Path, before: Path, rounds: int) -> dict[str, float]:
    """Microseconds per held-out PNG through `before`'s and this checkout's `bytes_to_input`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("preprocess_before", before)
    assert spec is not None and spec.loader is not None
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    with (data_dir / "test.csv").open(newline="") as handle:
        blobs = [(data_dir / r["filepath"]).read_bytes() for r in csv.DictReader(handle)]
    same = all(np.array_equal(old.bytes_to_input(b), bytes_to_input(b)) for b in blobs)
    best = {"before_us": float("inf"), "after_us": float("inf")}
    for _ in range(rounds):
        for name, fn in (("before_us", old.bytes_to_input), ("after_us", bytes_to_input)):
            started = time.perf_counter()
            for blob in blobs:
                fn(blob)
            best[name] = min(best[name], 1e6 * (time.perf_counter() - started) / len(blobs))
    return {**best, "identical_inputs": float(same)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build")
    p_build.add_argument("out", type=Path)
    p_build.add_argument("--data-dir", type=Path, default=paths.DEFAULT_DATA_DIR)
    p_build.add_argument("--per-condition", type=int, default=300)
    p_build.add_argument("--drawn", type=int, default=300)
    p_score = sub.add_parser("score")
    p_score.add_argument("out", type=Path)
    p_score.add_argument("--checkpoint", type=Path)
    p_speed = sub.add_parser("speed")
    p_speed.add_argument("--side", default="4000x3000")
    p_speed.add_argument("--repeat", type=int, default=30)
    p_png = sub.add_parser("png-speed")
    p_png.add_argument("--before", type=Path, required=True)
    p_png.add_argument("--data-dir", type=Path, default=paths.DEFAULT_DATA_DIR)
    p_png.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if args.command == "build":
        build(args.out, args.data_dir, args.per_condition, args.drawn)
    elif args.command == "score":
        from benchmarks.run import default_checkpoint

        checkpoint = args.checkpoint or default_checkpoint()
        print(json.dumps(score(args.out, checkpoint), indent=2))
    elif args.command == "png-speed":
        print(json.dumps(png_speed(args.data_dir, args.before, args.rounds), indent=2))
    else:
        width, height = (int(v) for v in args.side.split("x"))
        print(json.dumps(speed(width, height, args.repeat), indent=2))


if __name__ == "__main__":
    main()
