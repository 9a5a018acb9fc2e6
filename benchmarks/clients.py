"""Images/s through the protocols' own clients next to the seed route, in one run.

    flock /tmp/digitflow-bench.lock python -m benchmarks.clients [--checkpoint PATH]
        [--seconds 10] [--warmup 2] [--threads 4] [--per-request 1,64] [--rounds 3]

One digitflow server (2 workers, ONNX Runtime, as `make bench` serves it) on 127.0.0.1; for each
route, `--threads` client threads send the 1,000 held-out test PNGs round-robin for `--seconds`
after `--warmup`; the routes take turns, `--rounds` times, and each row is the median. Routes:
the seed's multipart predict (the baseline), OIP v2 through `tritonclient.http` (BYTES images
and FP32 pixels, binary tensors) and MLflow's `/invocations` (`dataframe_split` of base64
images, as `ScoringServerClient` sends it). Every answer is checked against its label. Every
route goes through geventhttpclient (the HTTP client inside `tritonclient.http`), so rows differ
by protocol, not by client library. The clients share the cores with the server: compare rows
with each other, not with `make bench`'s wrk numbers.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tritonclient.http as triton
from geventhttpclient import HTTPClient
from PIL import Image
from tests.support.processes import stop_process

from benchmarks import http_load
from benchmarks.run import default_checkpoint, load_samples
from digitflow import paths

Sender = Callable[[list[int]], list[int]]


def _http(url: str) -> HTTPClient:
    """The HTTP client tritonclient itself uses, so every row pays the same client cost."""
    host, port = url.removeprefix("http://").split(":")
    return HTTPClient(host, int(port), connection_timeout=60, network_timeout=60)


def v1_predict_sender(url: str, bodies: dict[int, bytes]) -> Callable[[], Sender]:
    def make() -> Sender:
        client = _http(url)
        headers = {"Content-Type": f"multipart/form-data; boundary={http_load.BOUNDARY}"}

        def send(indices: list[int]) -> list[int]:
            if len(indices) == 1:
                body = bodies[indices[0]]
            else:
                body = http_load.multipart_body([(SAMPLES[i][0], f"{i}.png") for i in indices])
            answer = client.post(http_load.PREDICT_PATH, body=body, headers=headers)
            data = answer.read()
            if answer.status_code != 200:
                raise RuntimeError(answer.status_code)
            return [int(item["prediction"]) for item in json.loads(data)["data"]]

        return send

    return make


def triton_sender(url: str, kind: str) -> Callable[[], Sender]:
    def make() -> Sender:
        client = triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=60)

        def send(indices: list[int]) -> list[int]:
            if kind == "images":
                tensor = triton.InferInput("images", [len(indices)], "BYTES")
                tensor.set_data_from_numpy(np.array([SAMPLES[i][0] for i in indices], object))
            else:
                tensor = triton.InferInput("pixels", [len(indices), 1, 28, 28], "FP32")
                tensor.set_data_from_numpy(PIXELS[indices])
            result = client.infer("mnist", [tensor], outputs=[triton.InferRequestedOutput("class")])
            return [int(v) for v in result.as_numpy("class")]

        return send

    return make


def mlflow_sender(url: str) -> Callable[[], Sender]:
    def make() -> Sender:
        client = _http(url)

        def send(indices: list[int]) -> list[int]:
            frame = {"columns": ["image"], "data": [[B64[i]] for i in indices]}
            answer = client.post(
                "/invocations",
                body=json.dumps({"dataframe_split": frame}),
                headers={"Content-Type": "application/json"},
            )
            data = answer.read()
            if answer.status_code != 200:
                raise RuntimeError(answer.status_code)
            return [p["prediction"] for p in json.loads(data)["predictions"]]

        return send

    return make


def drive(
    make: Callable[[], Sender], per_request: int, threads: int, seconds: float, warmup: float
) -> dict[str, float]:
    """Run `threads` closed-loop clients; count images answered inside the measured window."""
    start = time.monotonic() + warmup
    stop = start + seconds
    counts = [0] * threads
    correct = [0] * threads
    errors: list[str] = []

    def worker(slot: int) -> None:
        send = make()
        cursor = slot * 997
        while time.monotonic() < stop:
            indices = [(cursor + j) % len(SAMPLES) for j in range(per_request)]
            cursor += per_request * threads
            try:
                labels = send(indices)
            except Exception as exc:  # a failed request is counted, not fatal
                errors.append(type(exc).__name__)
                continue
            if time.monotonic() >= start:
                counts[slot] += len(labels)
                pairs = zip(labels, indices, strict=True)
                correct[slot] += sum(int(lab == SAMPLES[i][1]) for lab, i in pairs)

    pool = [threading.Thread(target=worker, args=(s,)) for s in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    images = sum(counts)
    return {
        "images_per_s": images / seconds,
        "accuracy": sum(correct) / images if images else 0.0,
        "errors": float(len(errors)),
    }


SAMPLES: list[tuple[bytes, int]] = []
PIXELS = np.zeros((0, 1, 28, 28), np.float32)
B64: list[str] = []


def main() -> None:
    global PIXELS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="model.pt (default: the default model)")
    parser.add_argument("--data", type=Path, default=paths.DEFAULT_DATA_DIR)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--per-request", default="1,64")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    checkpoint = args.checkpoint or default_checkpoint()
    SAMPLES.extend(load_samples(args.data))
    PIXELS = np.stack(
        [np.asarray(Image.open(io.BytesIO(png)), np.float32) / 255 for png, _ in SAMPLES]
    ).reshape(-1, 1, 28, 28)
    B64.extend(base64.b64encode(png).decode() for png, _ in SAMPLES)
    single = {
        i: http_load.multipart_body([(png, f"{i}.png")]) for i, (png, _) in enumerate(SAMPLES)
    }
    spec = http_load.ServerSpec(
        "digitflow",
        "digitflow_fastapi.main:APP",
        2,
        "uvicorn_worker.UvicornWorker",
        paths.PACKAGE_DIR.parent,
        {
            "PRED_MODEL_PATH": str(checkpoint),
            "PRED_MODEL_UUID": "bench",
            "INFERENCE_BACKEND": "onnx",
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.bin"
        probe.write_bytes(single[0])
        server = http_load.start_server(spec, Path(tmp), probe)
        try:
            routes = {
                "v1 multipart predict": v1_predict_sender(server.url, single),
                "OIP v2 BYTES images (tritonclient)": triton_sender(server.url, "images"),
                "OIP v2 FP32 pixels (tritonclient)": triton_sender(server.url, "pixels"),
                "MLflow /invocations dataframe_split": mlflow_sender(server.url),
            }
            print(
                f"threads {args.threads}, {args.seconds:.0f} s each after {args.warmup:.0f} s, "
                f"median of {args.rounds} rounds"
            )
            print("| route | images/req | images/s | vs seed | accuracy | errors |")
            print("|---|---:|---:|---:|---:|---:|")
            for per_request in (int(n) for n in args.per_request.split(",")):
                runs: dict[str, list[dict[str, float]]] = {name: [] for name in routes}
                for _ in range(args.rounds):
                    for name, make in routes.items():
                        runs[name].append(
                            drive(make, per_request, args.threads, args.seconds, args.warmup)
                        )
                baseline = 0.0
                for name, rows in runs.items():
                    rate = float(np.median([r["images_per_s"] for r in rows]))
                    baseline = baseline or rate
                    accuracy = min(r["accuracy"] for r in rows)
                    errors = sum(r["errors"] for r in rows)
                    print(
                        f"| {name} | {per_request} | {rate:,.0f} | {rate / baseline:.2f} "
                        f"| {accuracy:.3f} | {errors:.0f} |",
                        flush=True,
                    )
        finally:
            stop_process(server)


if __name__ == "__main__":
    main()
