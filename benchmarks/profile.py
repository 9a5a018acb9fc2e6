"""Where a digitflow worker's CPU goes under load: py-spy on every worker while wrk drives them.

    python -m benchmarks.profile [--checkpoint PATH] [--seconds 12] [--server digitflow-int8]

Starts digitflow the recommended way (2 workers, one thread each, ONNX Runtime), then for each
load (`--loads`, default c=64 with one PNG per request and c=16 with 64) runs wrk and, meanwhile,
`py-spy record --native` on each worker. Prints the share of samples by self frame and by the
project's own functions on the stack (inclusive), merged over workers, as shares of the busy
samples: a thread waiting in the kernel (epoll, a futex under a thread pool's queue) is idle.
The raw collapsed stacks
go to `benchmarks/results/profile-<stamp>/`.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.support.processes import stop_process

from benchmarks import http_load
from benchmarks.run import RESULTS_DIR, default_checkpoint, load_samples, server_specs
from digitflow import paths

PY_SPY = str(Path(sys.executable).parent / "py-spy")
OWN_CODE = ("digitflow/", "digitflow_fastapi/")
IDLE_LEAVES = ("epoll_wait", "epoll_pwait", "__futex", "futex", "pthread_cond", "sem_wait")
WAITING_PY = ("_worker (", "wait (", "get (")


def record(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling `pid`, native frames too, into collapsed stacks at `out`."""
    command = [PY_SPY, "record", "--pid", str(pid), "--duration", str(round(seconds))]
    command += ["--rate", "200", "--native", "--format", "raw", "--output", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def read_stacks(files: list[Path]) -> collections.Counter[tuple[str, ...]]:
    """Collapsed stacks (`frame;frame;... count`) summed over files."""
    stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
    for path in files:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def is_idle(stack: tuple[str, ...]) -> bool:
    """A thread parked in the kernel: the event loop in epoll, a pool thread waiting for work."""
    leaf = stack[-1]
    if leaf.startswith(IDLE_LEAVES):
        return True
    python = [frame for frame in stack if ".py" in frame]
    waiting = python[-1].startswith(WAITING_PY) if python else False
    return waiting and leaf.startswith("0x")  # an unresolved libc frame under a blocking get


def _short(frame: str) -> str:
    """`function (path/to/file.py:12)` → `function (file.py)`: lines differ, functions matter."""
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.split(':')[0]).name})" if where else name


def summarise(stacks: collections.Counter[tuple[str, ...]], top: int = 25) -> str:
    """Self-frame shares and inclusive shares of the project's functions, as Markdown."""
    idle = sum(count for stack, count in stacks.items() if is_idle(stack))
    total = (sum(stacks.values()) - idle) or 1
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for stack, count in stacks.items():
        if is_idle(stack):
            continue
        own[_short(stack[-1])] += count
        for frame in {_short(f) for f in stack if any(p in f for p in OWN_CODE)}:
            inclusive[frame] += count
    lines = [f"busy samples: {total} ({idle} idle left out)", ""]
    lines += ["| self frame | share of busy |", "|---|---:|"]
    lines += [f"| `{frame}` | {count / total:.1%} |" for frame, count in own.most_common(top)]
    lines += ["", "| project function (inclusive) | share of busy |", "|---|---:|"]
    lines += [f"| `{f}` | {count / total:.1%} |" for f, count in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="model.pt (default: the default model)")
    parser.add_argument("--data", type=Path, default=paths.DEFAULT_DATA_DIR)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--server", default="digitflow", help="e.g. digitflow-int8")
    parser.add_argument(
        "--loads", default="64x1,16x64", help="connections x images per request, comma-separated"
    )
    args = parser.parse_args()
    loads = [tuple(int(n) for n in load.split("x")) for load in args.loads.split(",")]
    if shutil.which(PY_SPY) is None:
        raise SystemExit("py-spy not found: pip install py-spy (in the dev extra)")
    checkpoint = args.checkpoint or default_checkpoint()
    samples = load_samples(args.data)
    out_dir = RESULTS_DIR / f"profile-{time.strftime('%Y%m%dT%H%M%S')}"
    out_dir.mkdir(parents=True)
    spec = server_specs(checkpoint)[args.server]
    with tempfile.TemporaryDirectory(prefix="digitflow-profile-") as tmp:
        bodies = {
            per_request: http_load.write_bodies(
                samples, Path(tmp) / f"x{per_request}", per_request, len(samples) // per_request
            )
            for per_request in {1, *(n for _, n in loads)}
        }
        server = http_load.start_server(spec, out_dir, bodies[1] / "0.bin")
        try:
            workers = [p for p in http_load.process_tree(server.pid) if p != server.pid]
            for connections, per_request in loads:
                http_load.run_wrk(server.url, bodies[per_request], connections, 3)  # warm-up
                files = [out_dir / f"c{connections}-x{per_request}-{pid}.txt" for pid in workers]
                spies = [
                    record(pid, args.seconds, f) for pid, f in zip(workers, files, strict=True)
                ]
                load = threading.Thread(
                    target=http_load.run_wrk,
                    args=(server.url, bodies[per_request], connections, args.seconds + 2),
                )
                load.start()
                for spy in spies:
                    _, err = spy.communicate(timeout=args.seconds + 60)
                    if spy.returncode != 0:
                        raise RuntimeError(f"py-spy failed: {err.decode()[-2000:]}")
                load.join()
                print(f"\n### c={connections}, {per_request} image(s) per request\n")
                print(summarise(read_stacks(files)), flush=True)
        finally:
            stop_process(server)
    print(f"\nraw stacks: {out_dir}")


if __name__ == "__main__":
    main()
