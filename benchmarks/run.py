"""`make bench`: the seed's reference design and digitflow, side by side, in one run.

    python -m benchmarks.run [--checkpoint PATH] [--seconds 15] [--warmup 3]
                             [--servers baseline,digitflow,digitflow-int8,python-floor,...,ray]

1. In-process limits per backend, and the ceilings (float and int8 graph): decode + preprocess +
   forward in as many processes as digitflow has workers (see `benchmarks.inprocess`).
2. For each server: start it (gunicorn + uvicorn workers on 127.0.0.1), drive it with wrk at
   concurrency 1, 16 and 64 with one real MNIST PNG per request, then 64 images per request,
   each measured for `--seconds` after a `--warmup`; every answer is checked against its label.
3. A Markdown table, the ratio digitflow / baseline, each digitflow run as a share of the
   ceiling (measured again just before each digitflow or floor server: the VM's speed drifts
   within a run), and JSON in `benchmarks/results/`.

Servers: `baseline` is `benchmarks/baseline_app.py` served the seed's way (`-w 4`,
`uvicorn.workers.UvicornWorker`); `digitflow` is served the recommended way (2 workers, one
thread each, ONNX Runtime); `digitflow-int8` the same on the run's int8 graph
(`INFERENCE_BACKEND=onnx-int8`); `digitflow-seed-cmd` is digitflow under the seed's own command;
`ray` is `digitflow serve --engine ray` (one replica per digitflow worker, local cluster);
`python-floor[-int8]` is `benchmarks/floor_app.py`, the least a Python ASGI predict can do
under the same command (no edge, no guard, no metrics): digitflow's distance from it is what its
own per-request work costs.
Run it on an otherwise idle machine; the numbers are only comparable within one run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tests.support.processes import stop_process

from benchmarks import http_load, inprocess
from digitflow import paths

RESULTS_DIR = Path(__file__).with_name("results")
RAY = "ray"  # `digitflow serve --engine ray` on a local cluster, one replica per core
SEED_WORKER = "uvicorn.workers.UvicornWorker"
FLOOR = "python-floor"  # benchmarks/floor_app.py: no features, the same decode, batcher, graph


def server_specs(checkpoint: Path) -> dict[str, http_load.ServerSpec]:
    """The servers this benchmark knows, by name."""
    model_env = {"PRED_MODEL_PATH": str(checkpoint), "PRED_MODEL_UUID": "bench"}
    return {
        "baseline": http_load.ServerSpec(
            "baseline",
            "benchmarks.baseline_app:APP",
            4,
            SEED_WORKER,
            paths.PROJECT_ROOT,
            model_env,
        ),
        "digitflow": http_load.ServerSpec(
            "digitflow",
            "digitflow_fastapi.main:APP",
            2,
            "uvicorn_worker.UvicornWorker",
            paths.PACKAGE_DIR.parent,
            {**model_env, "INFERENCE_BACKEND": "onnx"},
        ),
        "digitflow-int8": http_load.ServerSpec(
            "digitflow-int8",
            "digitflow_fastapi.main:APP",
            2,
            "uvicorn_worker.UvicornWorker",
            paths.PACKAGE_DIR.parent,
            {**model_env, "INFERENCE_BACKEND": "onnx-int8"},
        ),
        "digitflow-request-log": http_load.ServerSpec(
            "digitflow-request-log",
            "digitflow_fastapi.main:APP",
            2,
            "uvicorn_worker.UvicornWorker",
            paths.PACKAGE_DIR.parent,
            {**model_env, "INFERENCE_BACKEND": "onnx", "REQUEST_LOG": "true"},
        ),
        **{
            name: http_load.ServerSpec(
                name,
                "benchmarks.floor_app:APP",
                2,
                "uvicorn_worker.UvicornWorker",
                paths.PROJECT_ROOT,
                {**model_env, "INFERENCE_BACKEND": backend},
            )
            for name, backend in ((FLOOR, "onnx"), (f"{FLOOR}-int8", "onnx-int8"))
        },
        "digitflow-seed-cmd": http_load.ServerSpec(
            "digitflow-seed-cmd",
            "digitflow_fastapi.main:APP",
            4,
            SEED_WORKER,
            paths.PACKAGE_DIR.parent,
            model_env,
        ),
    }


def load_samples(data_dir: Path) -> list[tuple[bytes, int]]:
    """The 1,000 held-out test PNGs and their labels."""
    with (data_dir / "test.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [((data_dir / r["filepath"]).read_bytes(), int(r["label"])) for r in rows]


def default_checkpoint() -> Path:
    """The default model, trained first if the embedded store has none."""
    from digitflow.training.default_model import ensure_default_model

    return ensure_default_model(
        paths.DEFAULT_TRAIN_CONFIG, paths.DEFAULT_DATA_DIR, paths.DEFAULT_MLRUNS_DIR
    ).model_path


def bench_server(
    spec: http_load.ServerSpec,
    bodies: dict[int, Path],
    connections: list[int],
    seconds: float,
    warmup: float,
    log_dir: Path,
) -> list[dict[str, Any]]:
    """All load runs against one server, started and stopped here."""
    server = http_load.start_server(spec, log_dir, bodies[1] / "0.bin")
    rows = []
    try:
        idle = http_load.memory_mib(http_load.process_tree(server.pid))
        runs = [(c, 1) for c in connections] + [(16, 64)]
        for c, per_request in runs:
            row = http_load.measure(server, bodies[per_request], c, seconds, warmup, per_request)
            row.update(
                server=spec.name, workers=spec.workers, **{f"idle_{k}": v for k, v in idle.items()}
            )
            rows.append(row)
            print(format_row(row), flush=True)
    finally:
        stop_process(server)
    return rows


def format_row(r: dict[str, Any]) -> str:
    """One Markdown table row of a load run."""
    return (
        f"| {r['server']} (-w {r['workers']}) | {r['connections']} | {r['images_per_request']} "
        f"| {r['req_per_s']:,.0f} | {r['images_per_s']:,.0f} | {r['p50_ms']:.2f} "
        f"| {r['p99_ms']:.2f} | {r['errors']:.0f} | {r['accuracy']:.3f} "
        f"| {r['server_cpu_cores']:.2f} | {r['client_cpu_cores']:.2f} "
        f"| {r['rss_mib']:,.0f} / {r['pss_mib']:,.0f} |"
    )


HEADER = (
    "| server | c | images/req | req/s | images/s | p50 ms | p99 ms | errors | accuracy "
    "| server CPU (cores) | wrk CPU (cores) | RSS / PSS MiB |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """digitflow / baseline req/s (and images/s) for each matching run."""
    base = {
        (r["connections"], r["images_per_request"]): r for r in rows if r["server"] == "baseline"
    }
    lines = []
    for r in rows:
        key = (r["connections"], r["images_per_request"])
        if r["server"] != "baseline" and key in base and base[key]["images_per_s"] > 0:
            ratio = r["images_per_s"] / base[key]["images_per_s"]
            lines.append(f"{r['server']} / baseline at c={key[0]}, {key[1]} img/req: {ratio:.1f}×")
    return lines


def bench_ray_engine(
    checkpoint: Path,
    bodies: dict[int, Path],
    connections: list[int],
    args: argparse.Namespace,
    log_dir: Path,
) -> list[dict[str, Any]]:
    """The same wrk runs against Ray Serve, as many replicas as digitflow has workers."""
    from benchmarks.ray_http import LoadPlan, bench_ray

    replicas = server_specs(checkpoint)["digitflow"].workers
    plan = LoadPlan(connections, args.seconds, args.warmup)
    return bench_ray(checkpoint, replicas, bodies, plan, log_dir)


def ray_ratios(rows: list[dict[str, Any]]) -> list[str]:
    """Ray Serve's images/s as a share of gunicorn's (`digitflow`) for each matching run."""
    served = {
        (r["connections"], r["images_per_request"]): r for r in rows if r["server"] == "digitflow"
    }
    return [
        f"ray-serve / digitflow at c={r['connections']}, {r['images_per_request']} img/req: "
        f"{r['images_per_s'] / served[key]['images_per_s']:.0%}"
        for r in rows
        if r["server"] == "ray-serve"
        and (key := (r["connections"], r["images_per_request"])) in served
        and served[key]["images_per_s"] > 0
    ]


def ceiling_engine(server: str) -> str | None:
    """The graph whose ceiling a server is read against (None: not read against one)."""
    if not server.startswith(("digitflow", FLOOR)):
        return None
    return "onnx-int8" if "int8" in server else "onnx"


def ceiling_shares(rows: list[dict[str, Any]]) -> list[str]:
    """Each digitflow (and floor) run's images/s as a share of the in-process ceiling measured
    just before that server's runs, on the same graph (`ceiling_engine`), and the share of the
    machine wrk took meanwhile (the ceiling had every core to itself)."""
    cores = os.cpu_count() or 1
    return [
        f"{r['server']} at c={r['connections']}, {r['images_per_request']} img/req: "
        f"{r['images_per_s'] / r['ceiling_images_per_s']:.0%} of the {r['ceiling_engine']} "
        f"in-process ceiling ({r['ceiling_images_per_s']:,.0f} img/s); "
        f"wrk took {r['client_cpu_cores'] / cores:.0%} of the {cores} cores"
        for r in rows
        if r.get("ceiling_images_per_s", 0) > 0
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="model.pt (default: the default model)")
    parser.add_argument("--data", type=Path, default=paths.DEFAULT_DATA_DIR)
    parser.add_argument("--seconds", type=float, default=15.0, help="per measured load run")
    parser.add_argument("--warmup", type=float, default=3.0, help="before each load run")
    parser.add_argument("--inprocess-seconds", type=float, default=3.0)
    parser.add_argument("--connections", default="1,16,64")
    parser.add_argument(
        "--servers",
        default=f"baseline,digitflow,digitflow-int8,{FLOOR},{FLOOR}-int8,digitflow-seed-cmd,{RAY}",
    )
    parser.add_argument("--skip-inprocess", action="store_true")
    parser.add_argument(
        "--before-src",
        type=Path,
        help="the src/ of another checkout (e.g. a git worktree of the previous commit): adds "
        "servers 'digitflow-before' and 'digitflow-int8-before', served as 'digitflow' and "
        "'digitflow-int8' but from that code, for a before/after in one run",
    )
    args = parser.parse_args()

    checkpoint = args.checkpoint or default_checkpoint()
    samples = load_samples(args.data)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; "
        f"python {platform.python_version()}, torch {version('torch')}, "
        f"onnxruntime {version('onnxruntime')}, fastapi {version('fastapi')}, "
        f"uvicorn {version('uvicorn')}, gunicorn {version('gunicorn')}; checkpoint {checkpoint}"
    )
    report: dict[str, Any] = {"checkpoint": str(checkpoint), "started": stamp}
    if not args.skip_inprocess:
        report["inprocess"] = inprocess.measure_all(checkpoint, samples, args.inprocess_seconds)
        print("\nIn-process, 1 thread:\n" + inprocess.format_table(report["inprocess"]))
    workers = server_specs(checkpoint)["digitflow"].workers
    ceilings = {
        engine: inprocess.ceiling(checkpoint, samples, workers, args.inprocess_seconds, engine)
        for engine in inprocess.CEILING_ENGINES
    }
    report["ceiling_images_per_s"] = ceilings
    print(
        f"\nIn-process ceiling (decode + preprocess + forward at 64, {workers} processes, "
        "1 thread each): "
        + ", ".join(f"{engine} {rate:,.0f} img/s" for engine, rate in ceilings.items())
    )

    specs = server_specs(checkpoint)
    if args.before_src:
        src = str(args.before_src.resolve())
        for name in ("digitflow", "digitflow-int8"):
            current = specs[name]
            specs[f"{name}-before"] = http_load.ServerSpec(
                f"{name}-before",
                current.app,
                current.workers,
                current.worker_class,
                Path(src),
                {**current.env, "PYTHONPATH": src},
            )
    connections = [int(c) for c in args.connections.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="digitflow-bench-") as tmp:
        bodies = {
            1: http_load.write_bodies(samples, Path(tmp) / "single", 1, len(samples)),
            64: http_load.write_bodies(samples, Path(tmp) / "batch64", 64, 100),
        }
        log_dir = RESULTS_DIR / f"logs-{stamp}"
        print(f"\nHTTP load (wrk, {args.seconds:g} s per run after {args.warmup:g} s warm-up):")
        print(HEADER, flush=True)
        for name in args.servers.split(","):
            if name == RAY:
                rows += bench_ray_engine(checkpoint, bodies, connections, args, log_dir)
                continue
            engine = ceiling_engine(name)
            ceiling = 0.0
            if engine is not None:
                # Measured again right before the server: the VM's speed drifts within a run.
                ceiling = inprocess.ceiling(
                    checkpoint, samples, workers, args.inprocess_seconds, engine
                )
            served = bench_server(
                specs[name], bodies, connections, args.seconds, args.warmup, log_dir
            )
            for row in served:
                row.update(ceiling_engine=engine, ceiling_images_per_s=ceiling)
            rows += served
    report["http"] = rows
    print("\n" + "\n".join(ratios(rows) + ray_ratios(rows)))
    print("\n" + "\n".join(ceiling_shares(rows)))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"bench-{stamp}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
