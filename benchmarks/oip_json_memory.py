"""A worker's RSS around /v2 infer requests whose JSON is cheap to send and costly to parse.

    python -m benchmarks.oip_json_memory [--checkpoint model.pt]

Starts digitflow the seed's way (gunicorn, one worker) and, for each request, resets the
worker's peak RSS (`/proc/<pid>/clear_refs`), sends it, and prints the status, the time to the
answer, and the worker's RSS before, its peak during, and its RSS after (MiB). The requests:
the largest legitimate JSON request (64 images as nested `pixels` numbers), 10 MiB of
`[{},...]`, the same flood as a `pixels` tensor's `data`, 10 MiB of short strings, and the
legitimate request with 9 MiB of commas in its `id` (counted exactly, so accepted).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from tests.support.gunicorn_server import start_gunicorn, worker_pids
from tests.support.processes import stop_process, wait_for_http

from benchmarks.run import default_checkpoint

MIB = 1024 * 1024


def status_mib(pid: int, field: str) -> float:
    """`VmRSS` or `VmHWM` of `pid` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise LookupError(field)


def requests() -> dict[str, bytes]:
    """The bodies to send, by name."""
    pixels = np.random.default_rng(0).random((64, 1, 28, 28)).round(4).tolist()
    legit = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [64, 1, 28, 28]}]}
    legit["inputs"][0]["data"] = pixels
    flood = b"[" + b"{}," * (10 * MIB // 3 - 100) + b"{}]"
    head = b'{"inputs":[{"name":"pixels","datatype":"FP32","shape":[1,1,28,28],"data":'
    return {
        "64 images as pixels JSON": json.dumps(legit).encode(),
        "10 MiB of [{},...]": flood,
        "[{},...] as pixels data": head + flood + b"}]}",
        '10 MiB of ["ab",...]': b"[" + b'"ab",' * (2 * MIB - 100) + b'"ab"]',
        "64 images, 9 MiB of , in id": json.dumps({**legit, "id": "," * (9 * MIB)}).encode(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="model.pt (default: the default model)")
    args = parser.parse_args()
    checkpoint = args.checkpoint or default_checkpoint()
    env = {"PRED_MODEL_PATH": str(checkpoint), "PRED_MODEL_UUID": "bench"}
    with tempfile.TemporaryDirectory() as folder:
        server = start_gunicorn(Path(folder) / "gunicorn.log", env, workers=1)
        try:
            wait_for_http(server, "/ready", timeout=120)
            (worker,) = worker_pids(server.pid)
            url = f"{server.url}/v2/models/mnist/infer"
            with httpx.Client(timeout=120) as client:
                client.get(f"{server.url}/v2")  # warm the route
                for name, body in requests().items():
                    Path(f"/proc/{worker}/clear_refs").write_text("5")
                    before = status_mib(worker, "VmRSS")
                    started = time.perf_counter()
                    answer = client.post(url, content=body)
                    elapsed = time.perf_counter() - started
                    peak, after = status_mib(worker, "VmHWM"), status_mib(worker, "VmRSS")
                    print(
                        f"{name:26} {len(body) / MIB:5.2f} MiB → {answer.status_code} "
                        f"in {elapsed:5.2f} s; RSS {before:.0f} → peak {peak:.0f} "
                        f"(+{peak - before:.0f}) → {after:.0f} MiB; {answer.text[:70]}"
                    )
        finally:
            stop_process(server)


if __name__ == "__main__":
    main()
