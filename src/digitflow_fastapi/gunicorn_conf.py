"""gunicorn settings and hooks: loaded by `digitflow serve` (`-c python:<this module>`) and,
through the thin `src/gunicorn.conf.py`, by the seed's command run from `src/`.

- The master decides which model to serve once, before forking (`resolve_served_model`), and
  pins every worker, respawned ones included, to that file and run UUID through the environment
  they inherit: a registry alias that moves later cannot make two workers serve two models.
- Every uvicorn worker gets `connection_guard` (header and body deadlines, header and connection
  caps), whichever worker class the command line names.
- Tells workers how many siblings they have, so each sizes its thread pool to cores // workers.
- `reuse_port` (setting `REUSE_PORT`, default on): each worker binds its own SO_REUSEPORT
  listening socket and the kernel spreads new connections evenly over them. With one shared
  socket, whichever worker is idle at that instant accepts them all (measured: 64 of 64
  keep-alive connections on one of two workers, -30% throughput). A stopping worker serves
  whatever is still queued on its own socket (`listener_drain`) instead of resetting it.
- Because SO_REUSEPORT would let a second server on the same port share it silently, the
  master first checks that nothing listens there and stops with a clear message if it does.
- Metrics: `DIGITFLOW_METRICS_DIR` (a fresh temporary folder unless set) is where workers write
  their metric snapshots, so `/metrics` reports all of them (see `digitflow_fastapi.metrics`);
  the folder is removed at exit if this module made it.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from digitflow_fastapi.config import Settings

__all__ = ["control_socket_disable", "on_exit", "on_starting", "post_worker_init", "reuse_port"]


def _reuse_port() -> bool:
    from digitflow.errors import ConfigError
    from digitflow_fastapi.config import get_settings

    try:
        return get_settings().REUSE_PORT
    except ConfigError:
        return True  # on_starting reports the bad setting in one line


reuse_port = _reuse_port()
# gunicorn >= 25 opens a control socket at one path per user ($XDG_RUNTIME_DIR or ~/.gunicorn):
# two servers of one user would share it, and the second's exit deletes the first's. Signals
# (TERM, HUP, TTIN/TTOU) do the same job per master.
control_socket_disable = True

_made_metrics_dir: Path | None = None  # set in the master when it creates the folder


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


def _prepare_metrics_dir(configured: Path | None) -> None:
    global _made_metrics_dir
    folder = configured
    if folder is None:
        folder = _made_metrics_dir = Path(tempfile.mkdtemp(prefix="digitflow-metrics-"))
        os.environ["DIGITFLOW_METRICS_DIR"] = str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("worker-*.json"):  # an earlier run's totals would be added
        stale.unlink()


def _pin_served_model(settings: Settings) -> None:
    """Resolve the model once and hand every worker the same file and UUID (or exit, one line)."""
    from digitflow.errors import DigitflowError
    from digitflow_fastapi.app import served_model

    try:
        served = served_model(settings)
    except DigitflowError as exc:
        sys.exit(f"start-up failed: {exc}")
    os.environ["PRED_MODEL_PATH"] = str(served.model_path)
    os.environ["PRED_MODEL_UUID"] = served.model_uuid


def on_starting(server: Any) -> None:
    """Refuse a busy port, pin the model, export the worker count, prepare the metrics folder."""
    from digitflow.errors import ConfigError
    from digitflow_fastapi.config import get_settings

    _refuse_busy_ports(list(server.cfg.address))
    try:
        settings = get_settings()
    except ConfigError as exc:
        sys.exit(f"start-up failed: {exc}")
    _pin_served_model(settings)
    os.environ["WEB_CONCURRENCY"] = str(server.cfg.workers)
    _prepare_metrics_dir(settings.DIGITFLOW_METRICS_DIR)
    get_settings.cache_clear()  # workers read the values exported here


def post_worker_init(worker: Any) -> None:
    """Give a uvicorn worker the connection guard (deadlines, header and connection caps) and
    a shutdown that serves the connections still queued on its sockets."""
    from digitflow_fastapi import listener_drain
    from digitflow_fastapi.config import get_settings
    from digitflow_fastapi.connection_guard import ConnectionLimits, GuardedHttpToolsProtocol

    config = getattr(worker, "config", None)
    if config is None or not hasattr(config, "http"):
        return  # not a uvicorn worker
    if not listener_drain.install(worker):
        worker.log.warning("%s: connections queued at shutdown will be reset", type(worker))
    settings = get_settings()
    limits = ConnectionLimits(
        header_timeout=settings.HEADER_TIMEOUT_S,
        body_timeout=settings.BODY_TIMEOUT_S,
        max_header_bytes=settings.MAX_HEADER_BYTES,
        max_header_count=settings.MAX_HEADER_COUNT,
        max_connections=settings.MAX_CONNECTIONS_PER_WORKER,
    )
    config.http = GuardedHttpToolsProtocol.configured(limits)


def on_exit(server: Any) -> None:
    """Remove the metrics folder if this module created it."""
    if _made_metrics_dir is not None:
        shutil.rmtree(_made_metrics_dir, ignore_errors=True)
