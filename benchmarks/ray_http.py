"""`digitflow serve` on gunicorn next to `digitflow serve --engine ray`, in one run.

    flock /tmp/digitflow-bench.lock python -m benchmarks.ray_http [--checkpoint PATH]
        [--seconds 15] [--warmup 3] [--connections 1,16,64] [--replicas 2]

Both serve the same checkpoint with the same number of processes doing inference (gunicorn
workers / Ray Serve replicas, one intra-op thread each, ONNX Runtime) on 127.0.0.1. wrk drives
each at every concurrency with one real MNIST PNG per request, then 64 per request at c=16;
every answer is checked against its label. The Ray side runs a local single-node cluster (no
dashboard, 200 MB object store); its CPU and memory columns cover the whole cluster (GCS,
raylet, proxy, controller, replicas). JSON goes to `benchmarks/results/`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tests.support.processes import ServerProcess, free_port, start_process, stop_process

from benchmarks import http_load
from benchmarks.run import (
    HEADER,
    RESULTS_DIR,
    default_checkpoint,
    format_row,
    load_samples,
    server_specs,
)
from digitflow import paths


def start_ray_engine(
    checkpoint: Path, replicas: int, log_dir: Path, probe_body: Path, ray_tmp: str
) -> ServerProcess:
    """`python -m digitflow_fastapi.scale.ray_serve` on a free port, ready once predict answers."""
    port = free_port()
    command = [sys.executable, "-m", "digitflow_fastapi.scale.ray_serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--replicas", str(replicas)]
    env = {
        "PRED_MODEL_PATH": str(checkpoint),
        "PRED_MODEL_UUID": "bench",
        "INFERENCE_BACKEND": "onnx",
        "RAY_TMPDIR": ray_tmp,
        "RAY_ADDRESS": "",
    }
    server = start_process(command, log_dir / "ray-serve.log", f"http://127.0.0.1:{port}", env)
    body = probe_body.read_bytes()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"ray engine exited:\n{server.log()[-3000:]}")
        request = urllib.request.Request(
            server.url + http_load.PREDICT_PATH,
            data=body,
            headers={"Content-Type": f"multipart/form-data; boundary={http_load.BOUNDARY}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                if answer.status == 200:
                    return server
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    stop_ray_engine(server)
    raise RuntimeError(f"ray engine did not answer within 300 s:\n{server.log()[-3000:]}")


def stop_ray_engine(server: ServerProcess) -> None:
    """SIGTERM the engine by PID (it stops its local cluster), then SIGKILL what is left of it."""
    cluster = http_load.process_tree(server.pid)[1:]
    if server.alive():
        os.kill(server.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=90)
        except Exception:
            os.kill(server.pid, signal.SIGKILL)
            server.process.wait(timeout=10)
    for pid in cluster:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass(frozen=True)
class LoadPlan:
    """The wrk runs every server gets."""

    connections: list[int]
    seconds: float
    warmup: float


def load_runs(
    server: ServerProcess, name: str, processes: int, bodies: dict[int, Path], plan: LoadPlan
) -> list[dict[str, Any]]:
    """Every load run against one started server."""
    rows = []
    idle = http_load.memory_mib(http_load.process_tree(server.pid))
    for c, per_request in [(c, 1) for c in plan.connections] + [(16, 64)]:
        row = http_load.measure(
            server, bodies[per_request], c, plan.seconds, plan.warmup, per_request
        )
        row.update(server=name, workers=processes, **{f"idle_{k}": v for k, v in idle.items()})
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def per_cpu_second(row: dict[str, Any]) -> float:
    """Images answered per CPU-second the server used: fair even when other load on the
    machine leaves a server fewer cores than it could use."""
    return float(row["images_per_s"] / max(row["server_cpu_cores"], 1e-9))


def bench_gunicorn(
    checkpoint: Path, workers: int, bodies: dict[int, Path], plan: LoadPlan, log_dir: Path
) -> list[dict[str, Any]]:
    """`digitflow serve`'s way: gunicorn, uvicorn workers, ONNX Runtime, one thread each."""
    spec = server_specs(checkpoint)["digitflow"]
    spec = http_load.ServerSpec(
        "gunicorn", spec.app, workers, spec.worker_class, spec.cwd, spec.env
    )
    server = http_load.start_server(spec, log_dir, bodies[1] / "0.bin")
    try:
        return load_runs(server, "gunicorn", workers, bodies, plan)
    finally:
        stop_process(server)


def bench_ray(
    checkpoint: Path, replicas: int, bodies: dict[int, Path], plan: LoadPlan, log_dir: Path
) -> list[dict[str, Any]]:
    """`digitflow serve --engine ray` on a local cluster of its own."""
    ray_tmp = tempfile.mkdtemp(prefix="dfray-")
    server = start_ray_engine(checkpoint, replicas, log_dir, bodies[1] / "0.bin", ray_tmp)
    try:
        return load_runs(server, "ray-serve", replicas, bodies, plan)
    finally:
        stop_ray_engine(server)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="model.pt (default: the default model)")
    parser.add_argument("--data", type=Path, default=paths.DEFAULT_DATA_DIR)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--connections", default="1,16,64")
    parser.add_argument("--replicas", type=int, default=2, help="gunicorn workers = replicas")
    parser.add_argument("--ray-first", action="store_true", help="measure Ray Serve first")
    args = parser.parse_args()

    checkpoint = args.checkpoint or default_checkpoint()
    samples = load_samples(args.data)
    run = LoadPlan([int(c) for c in args.connections.split(",")], args.seconds, args.warmup)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    log_dir = RESULTS_DIR / f"logs-ray-{stamp}"
    print(
        f"{os.cpu_count()} cores; ray {version('ray')}, gunicorn {version('gunicorn')}, "
        f"onnxruntime {version('onnxruntime')}; checkpoint {checkpoint}; {args.seconds:g} s per "
        f"run after {args.warmup:g} s warm-up\n\n{HEADER}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="digitflow-bench-") as tmp:
        bodies = {
            1: http_load.write_bodies(samples, Path(tmp) / "single", 1, len(samples)),
            64: http_load.write_bodies(samples, Path(tmp) / "batch64", 64, 100),
        }
        engines = [
            lambda: bench_gunicorn(checkpoint, args.replicas, bodies, run, log_dir),
            lambda: bench_ray(checkpoint, args.replicas, bodies, run, log_dir),
        ]
        for engine in reversed(engines) if args.ray_first else engines:
            rows += engine()
    for ray_row in (r for r in rows if r["server"] == "ray-serve"):
        key = (ray_row["connections"], ray_row["images_per_request"])
        base = next(
            r
            for r in rows
            if r["server"] == "gunicorn" and (r["connections"], r["images_per_request"]) == key
        )
        print(
            f"ray / gunicorn at c={key[0]}, {key[1]} img/req: "
            f"{ray_row['req_per_s'] / base['req_per_s']:.2f}× req/s, "
            f"p99 {ray_row['p99_ms']:.1f} vs {base['p99_ms']:.1f} ms, images per server "
            f"CPU-second {per_cpu_second(ray_row):,.0f} vs {per_cpu_second(base):,.0f}"
        )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"ray-http-{stamp}.json"
    out.write_text(json.dumps({"checkpoint": str(checkpoint), "http": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
