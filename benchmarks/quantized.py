"""Would an int8 graph serve the same answers faster? ONNX Runtime's quantizers vs the float one.

    python -m benchmarks.quantized [--checkpoint PATH] [--photos DIR] [--calibration 300]

Quantizes the run's `model.onnx` (or an export of the checkpoint) two ways: dynamic (int8
weights) and static QDQ (int8 weights and uint8 activations, calibrated on `--calibration`
training PNGs, never held-out ones: what `digitflow train` keeps as `model.int8.onnx`).
Prints, for the float graph and each int8 one: forward images/s at 64 per call on one thread
(the graphs alternate, three rounds), accuracy on the 1,000 held-out PNGs and agreement with
the float graph's classes, and the same on a photo set made by
`python -m benchmarks.photos build DIR` when `--photos` names one. The issue's bar for serving
an int8 graph: accuracy within 0.2 pp and classes agreeing on at least 99.5 %.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from benchmarks.run import default_checkpoint
from digitflow import paths
from digitflow.artifacts.run_layout import onnx_path
from digitflow.inference import onnx_export
from digitflow.inference.preprocess import bytes_to_input

ROUNDS = 3


def split_inputs(data_dir: Path, split: str, limit: int | None = None) -> tuple[Any, Any]:
    """[N,1,28,28] inputs and labels of a split's PNGs, preprocessed the serving way."""
    with (data_dir / f"{split}.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))[:limit]
    images = np.stack([bytes_to_input((data_dir / r["filepath"]).read_bytes()) for r in rows])
    return images[:, None], np.array([int(r["label"]) for r in rows])


def photo_inputs(folder: Path) -> tuple[Any, Any]:
    """The photo set's inputs and labels (`labels.csv`: file,condition,label)."""
    with (folder / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    images = np.stack([bytes_to_input((folder / r["file"]).read_bytes()) for r in rows])
    return images[:, None], np.array([int(r["label"]) for r in rows])


def float_graph(checkpoint: Path) -> bytes:
    """The graph logged beside the checkpoint, else a fresh export of it."""
    logged = onnx_path(checkpoint)
    if logged.is_file():
        return logged.read_bytes()
    from digitflow.training.checkpoint import load_model

    return onnx_export.export_model(load_model(checkpoint), None, "")


def quantized_graphs(graph: bytes, calibration: npt.NDArray[np.float32]) -> dict[str, bytes]:
    """Dynamic int8 and static-QDQ int8 (what training keeps: `training.quantize`) versions."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from digitflow.training.quantize import quantize

    with tempfile.TemporaryDirectory(prefix="digitflow-int8-") as tmp:
        source, dynamic = Path(tmp) / "f.onnx", Path(tmp) / "d.onnx"
        source.write_bytes(graph)
        quantize_dynamic(source, dynamic, weight_type=QuantType.QInt8)
        return {
            "dynamic int8": dynamic.read_bytes(),
            "static int8 (QDQ)": quantize(graph, calibration),
        }


def forward_rate(session: Any, batch: npt.NDArray[np.float32], seconds: float) -> float:
    """Images/s of repeated forward passes on `batch`."""
    session.run(None, {"images": batch})
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, {"images": batch})
        calls += 1
    return len(batch) * calls / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="model.pt (default: the default model)")
    parser.add_argument("--data", type=Path, default=paths.DEFAULT_DATA_DIR)
    parser.add_argument("--photos", type=Path, help="a set from `benchmarks.photos build`")
    parser.add_argument("--calibration", type=int, default=300, help="training PNGs")
    parser.add_argument("--seconds", type=float, default=2.0, help="per forward-rate round")
    args = parser.parse_args()

    checkpoint = args.checkpoint or default_checkpoint()
    graph = float_graph(checkpoint)
    calibration, _ = split_inputs(args.data, "train", args.calibration)
    graphs = {"float": graph, **quantized_graphs(graph, calibration)}
    sessions = {name: onnx_export.onnx_session(data, 1) for name, data in graphs.items()}
    sets = {"held-out PNGs": split_inputs(args.data, "test")}
    if args.photos:
        sets["photos"] = photo_inputs(args.photos)
    rates: dict[str, list[float]] = {name: [] for name in sessions}
    batch = sets["held-out PNGs"][0][:64]
    for _ in range(ROUNDS):
        for name, session in sessions.items():
            rates[name].append(forward_rate(session, batch, args.seconds))
    print(f"checkpoint {checkpoint}; {args.calibration} training PNGs for calibration\n")
    print(
        "| graph | fwd img/s @64, 1 thread (median of 3) | "
        + " | ".join(f"{s}: accuracy | {s}: same class as float" for s in sets)
        + " |"
    )
    print("|---|---:|" + "---:|---:|" * len(sets))
    reference = {
        s: sessions["float"].run(None, {"images": x})[0].argmax(1) for s, (x, _) in sets.items()
    }
    for name, session in sessions.items():
        cells = [f"{float(np.median(rates[name])):,.0f}"]
        for s, (x, y) in sets.items():
            predicted = session.run(None, {"images": x})[0].argmax(1)
            cells += [f"{np.mean(predicted == y):.2%}", f"{np.mean(predicted == reference[s]):.2%}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
