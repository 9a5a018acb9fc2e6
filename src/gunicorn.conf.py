"""Loaded by gunicorn from `src/` (the seed's command) and by `digitflow serve`.

- Tells workers how many siblings they have, so each sizes its thread pool to cores // workers.
- `reuse_port`: each worker binds its own SO_REUSEPORT listening socket and the kernel spreads
  new connections evenly over them. With one shared socket, whichever worker is idle at that
  instant accepts them all (measured: 64 of 64 keep-alive connections on one of two workers,
  -30% throughput). Caveat: connections still queued on a worker's socket when that worker
  exits are reset, and clients retry.
- Because SO_REUSEPORT would let a second server on the same port share it silently, the
  master first checks that nothing listens there and stops with a clear message if it does.
- Metrics: `DIGITFLOW_METRICS_DIR` (a fresh temporary folder unless set) is where workers write
  their metric snapshots, so `/metrics` reports all of them (see `digitflow_fastapi.metrics`);
  the folder is removed at exit if this file made it.
"""

import errno
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

reuse_port = True


def _refuse_busy_ports(addresses: list[Any]) -> None:
    for address in addresses:
        if not isinstance(address, tuple):
            continue  # unix socket or fd: nothing to probe
        host, port = address[0], address[1]
        family = socket.AF_INET6 if ":" in str(host) else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    sys.exit(f"address {host}:{port} is already in use by another server")
                raise


_MADE_METRICS_DIR = "DIGITFLOW_MADE_METRICS_DIR"


def _prepare_metrics_dir() -> None:
    folder = os.environ.get("DIGITFLOW_METRICS_DIR")
    if not folder:
        folder = tempfile.mkdtemp(prefix="digitflow-metrics-")
        os.environ["DIGITFLOW_METRICS_DIR"] = folder
        os.environ[_MADE_METRICS_DIR] = folder
    Path(folder).mkdir(parents=True, exist_ok=True)
    for stale in Path(folder).glob("worker-*.json"):  # an earlier run's totals would be added
        stale.unlink()


def on_starting(server: Any) -> None:
    """Refuse a busy port; export the worker count (each worker uses cores // workers threads)."""
    _refuse_busy_ports(list(server.cfg.address))
    os.environ.setdefault("WEB_CONCURRENCY", str(server.cfg.workers))
    _prepare_metrics_dir()


def on_exit(server: Any) -> None:
    """Remove the metrics folder if this file created it."""
    made = os.environ.get(_MADE_METRICS_DIR)
    if made:
        shutil.rmtree(made, ignore_errors=True)
