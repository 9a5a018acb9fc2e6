"""HTTP load harness: start a server, drive it with wrk, read its CPU and memory from /proc.

Each server is started as gunicorn with uvicorn workers in its own process group, found ready
when a real predict request answers 200, and stopped by PID. wrk (Debian package `wrk`) runs
`benchmarks/wrk_mnist.lua`, which rotates real MNIST PNGs as multipart bodies and checks every
answer against its label.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.processes import ServerProcess, free_port, start_process, stop_process

LUA_SCRIPT = Path(__file__).with_name("wrk_mnist.lua")
BOUNDARY = "digitflowbenchboundary"
PREDICT_PATH = "/api/v1/model/predict"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def multipart_body(images: Sequence[tuple[bytes, str]]) -> bytes:
    """A multipart/form-data body with one `image_file` part per (PNG bytes, file name)."""
    chunks = []
    for data, filename in images:
        chunks.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image_file"; '
            f'filename="{filename}"\r\nContent-Type: image/png\r\n\r\n'.encode()
        )
        chunks.append(data + b"\r\n")
    chunks.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(chunks)


def write_bodies(
    samples: Sequence[tuple[bytes, int]], folder: Path, per_request: int, count: int
) -> Path:
    """Write `count` bodies of `per_request` images each, named `<index>_<label>.png`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        chosen = [(i * per_request + j) % len(samples) for j in range(per_request)]
        body = multipart_body([(samples[k][0], f"{k}_{samples[k][1]}.png") for k in chosen])
        (folder / f"{i}.bin").write_bytes(body)
    (folder / "count").write_text(str(count))
    (folder / "boundary").write_text(BOUNDARY)
    return folder


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds used so far by `pids` (processes that are gone count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def memory_mib(pids: Sequence[int]) -> dict[str, float]:
    """Summed RSS and PSS (shared pages split between processes) of `pids`, in MiB."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return {"rss_mib": rss / 1024, "pss_mib": pss / 1024}


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server under test."""

    name: str
    app: str
    workers: int
    worker_class: str
    cwd: Path
    env: dict[str, str]


def start_server(spec: ServerSpec, log_dir: Path, probe_body: Path) -> ServerProcess:
    """Start `spec` on a free loopback port and wait until a predict request answers 200."""
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "gunicorn"),
        spec.app,
        "-b",
        f"127.0.0.1:{port}",
        "-w",
        str(spec.workers),
        "-k",
        spec.worker_class,
        "--timeout",
        "120",
    ]
    server = start_process(
        command, log_dir / f"{spec.name}.log", f"http://127.0.0.1:{port}", spec.env, spec.cwd
    )
    body = probe_body.read_bytes()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"{spec.name} exited:\n{server.log()[-3000:]}")
        request = urllib.request.Request(
            server.url + PREDICT_PATH,
            data=body,
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                if answer.status == 200:
                    return server
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    stop_process(server)
    raise RuntimeError(f"{spec.name} did not answer within 180 s:\n{server.log()[-3000:]}")


def run_wrk(
    url: str, body_dir: Path, connections: int, seconds: float, threads: int = 1
) -> dict[str, float]:
    """Run wrk once and return its JSON summary (latencies in µs), with the CPU seconds wrk
    itself used (`client_cpu_s`): it shares the machine's cores with the server."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    command = [
        wrk,
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA_SCRIPT),
        url + PREDICT_PATH,
        "--",
        str(body_dir),
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        out = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)  # wrk's own rusage, not other children's
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, command, out)
    for line in out.splitlines():
        if line.startswith("WRK_JSON "):
            result: dict[str, float] = json.loads(line.removeprefix("WRK_JSON "))
            result["client_cpu_s"] = usage.ru_utime + usage.ru_stime
            return result
    raise RuntimeError(f"wrk printed no summary:\n{out}")


def measure(
    server: ServerProcess,
    body_dir: Path,
    connections: int,
    seconds: float,
    warmup: float,
    images_per_request: int = 1,
) -> dict[str, float]:
    """Warm up, then one measured wrk run with the server tree's CPU and memory around it."""
    if warmup > 0:
        run_wrk(server.url, body_dir, connections, warmup)
    pids = process_tree(server.pid)
    cpu_before = cpu_seconds(pids)
    started = time.monotonic()
    result = run_wrk(server.url, body_dir, connections, seconds)
    elapsed = time.monotonic() - started
    cpu = (cpu_seconds(pids) - cpu_before) / elapsed
    duration = result["duration_us"] / 1e6
    errors = result["bad_status"] + result["socket_errors"] + result["timeouts"]
    answers = result["answers"]
    return {
        "connections": connections,
        "images_per_request": images_per_request,
        "req_per_s": result["requests"] / duration,
        "images_per_s": answers / duration,
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "errors": errors + result["unparsed"],
        "accuracy": result["correct"] / answers if answers else 0.0,
        "server_cpu_cores": cpu,
        "client_cpu_cores": result["client_cpu_s"] / elapsed,
        **memory_mib(process_tree(server.pid)),
    }
