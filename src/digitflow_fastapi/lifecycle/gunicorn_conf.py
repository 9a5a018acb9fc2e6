"""gunicorn settings and hooks: loaded by `digitflow serve` (`-c python:<this module>`) and,
through the thin `src/gunicorn.conf.py`, by the seed's command run from `src/`.

- The master decides which model to serve once, before forking (`handoff.decided_pin`: the
  decision `digitflow serve` made before it became this master, else made here), and publishes
  it as generation 0 of the model state folder, which every worker, respawned ones included,
  reads: a registry alias that moves later cannot make two workers serve two models.
- Forwarded headers (X-Forwarded-For/-Proto) are believed only from `FORWARDED_ALLOW_IPS`
  (empty by default; gunicorn's own default would trust 127.0.0.1).
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
- Model swaps: SIGHUP does not reload gunicorn's config or replace workers; it re-resolves the
  configured model, verifies it in a child process and the workers switch in place
  (`model_keeper`, `model_state`, `model_swap`); `MODEL_POLL_SECONDS` follows a registry alias.
- Metrics: `DIGITFLOW_METRICS_DIR` (a fresh temporary folder unless set; see `handoff`) is
  where workers write
  their metric snapshots, so `/metrics` reports all of them (see `digitflow_fastapi.metrics`);
  the folder is removed at exit if this module made it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from digitflow.artifacts.refs import ServedModel
    from digitflow_fastapi.config import Settings
    from digitflow_fastapi.lifecycle.handoff import Handoff

__all__ = [
    "control_socket_disable",
    "forwarded_allow_ips",
    "on_exit",
    "on_starting",
    "post_worker_init",
    "reuse_port",
]


def _reuse_port() -> bool:
    from digitflow.errors import ConfigError
    from digitflow_fastapi.config import get_settings

    try:
        return get_settings().REUSE_PORT
    except ConfigError:
        return True  # on_starting reports the bad setting in one line


reuse_port = _reuse_port()


def _forwarded_allow_ips() -> str:
    from digitflow.errors import ConfigError
    from digitflow_fastapi.config import get_settings

    try:
        return get_settings().FORWARDED_ALLOW_IPS  # gunicorn wants the comma-separated string
    except ConfigError:
        return ""  # on_starting reports the bad setting in one line


# Whose X-Forwarded-For the uvicorn workers believe: only FORWARDED_ALLOW_IPS (empty by default),
# not gunicorn's default of 127.0.0.1, so a local sidecar passing the header on cannot let a
# client choose its rate-limit bucket. `--forwarded-allow-ips` on the command line still wins.
forwarded_allow_ips = _forwarded_allow_ips()
# gunicorn >= 25 opens a control socket at one path per user ($XDG_RUNTIME_DIR or ~/.gunicorn):
# two servers of one user would share it, and the second's exit deletes the first's. Signals
# (TERM, HUP, TTIN/TTOU) do the same job per master.
control_socket_disable = True

_made_metrics_dir: Path | None = None  # set in the master when it creates the folder
_made_model_state_dir: Path | None = None  # likewise, for the model swap state
_watcher: subprocess.Popen[bytes] | None = None  # the registry poller (MODEL_POLL_SECONDS)


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


MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def _advise_migrate_req(server: Any) -> None:
    """With one socket per worker, say how to keep a stopping worker's last handshakes."""
    try:
        off = reuse_port and MIGRATE_REQ.read_text().strip() == "0"
    except OSError:
        return  # not Linux, or an older kernel without the setting
    if off:
        server.log.info(
            "REUSE_PORT: a connection whose handshake completes in the microseconds while a "
            "worker closes its socket is reset; sysctl net.ipv4.tcp_migrate_req=1 moves it to "
            "a sibling instead"
        )


def _prepare_metrics_dir(configured: Path | None) -> None:
    global _made_metrics_dir
    folder = configured
    if folder is None:
        folder = _made_metrics_dir = Path(tempfile.mkdtemp(prefix="digitflow-metrics-"))
        os.environ["DIGITFLOW_METRICS_DIR"] = str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("worker-*.json"):  # an earlier run's totals would be added
        stale.unlink()


def _served_model(settings: Settings, handoff: Handoff) -> ServedModel:
    """The start's one decision of which model to serve, made local here (a run is pulled), or
    exit with one line."""
    from digitflow.artifacts.refs import served_model_of
    from digitflow.errors import DigitflowError
    from digitflow.settings import read_core_settings
    from digitflow_fastapi.lifecycle.handoff import decided_pin

    try:
        store = read_core_settings().store()
        pin = decided_pin(settings, handoff, store)
        return served_model_of(pin, settings.PRED_MODELS_DIR, store)
    except DigitflowError as exc:
        sys.exit(f"start-up failed: {exc}")


def _prepare_model_state(server: Any, settings: Settings, served: ServedModel) -> None:
    """Publish the start-up model as generation 0, make SIGHUP a model swap, start the poller.

    gunicorn's own SIGHUP (reload the config, replace every worker) would make requests wait for
    new workers to boot, and a bad model would stop the server; `model_keeper` verifies the new
    model in a child process instead, and the workers switch in place (see `model_swap`).
    """
    global _made_model_state_dir, _watcher
    from digitflow.artifacts.refs import parse_reference
    from digitflow.errors import DigitflowError
    from digitflow_fastapi.lifecycle.model_keeper import keeper_command, publish_start_model
    from digitflow_fastapi.lifecycle.model_state import ModelSource

    source = ModelSource(
        str(settings.PRED_MODEL_PATH) if settings.PRED_MODEL_PATH is not None else None,
        settings.PRED_MODEL_URI or None,
        settings.PRED_MODEL_UUID or None,
    )
    polling = settings.MODEL_POLL_SECONDS > 0
    if polling and (source.model_path or parse_reference(source.model_uri or "").kind != "model"):
        sys.exit(
            "start-up failed: MODEL_POLL_SECONDS follows a registry reference: set "
            "PRED_MODEL_URI=models:/<name>@<alias> and leave PRED_MODEL_PATH unset"
        )
    folder = _made_model_state_dir = Path(tempfile.mkdtemp(prefix="digitflow-model-"))
    os.environ["DIGITFLOW_MODEL_STATE_DIR"] = str(folder)
    try:
        publish_start_model(folder, source, served)
    except (OSError, DigitflowError) as exc:
        sys.exit(f"start-up failed: {exc}")
    server.handle_hup = partial(_start_swap, server, folder)  # the arbiter looks it up by name
    if polling:
        every = str(settings.MODEL_POLL_SECONDS)
        _watcher = subprocess.Popen(
            keeper_command("watch", folder, "--every", every, "--parent-pid", str(os.getpid()))
        )


def _start_swap(server: Any, folder: Path) -> None:
    """SIGHUP: verify the configured model in a child process; workers keep serving meanwhile."""
    from digitflow_fastapi.lifecycle.model_keeper import keeper_command

    server.log.info("Hang up: checking the configured model for a swap (workers keep serving)")
    subprocess.Popen(keeper_command("swap", folder, "--reason", "hup"))  # reaped by the arbiter


def on_starting(server: Any) -> None:
    """Refuse a busy port, decide the model, export the worker count, prepare the metrics and
    model-state folders, make SIGHUP a model swap."""
    from digitflow.errors import ConfigError
    from digitflow_fastapi.config import get_settings
    from digitflow_fastapi.lifecycle.handoff import read_handoff

    _refuse_busy_ports(list(server.cfg.address))
    _advise_migrate_req(server)
    try:
        settings, handoff = get_settings(), read_handoff()
    except ConfigError as exc:
        sys.exit(f"start-up failed: {exc}")
    served = _served_model(settings, handoff)
    os.environ["WEB_CONCURRENCY"] = str(server.cfg.workers)
    _prepare_metrics_dir(handoff.DIGITFLOW_METRICS_DIR)
    _prepare_model_state(server, settings, served)
    get_settings.cache_clear()  # workers read the values exported here
    read_handoff.cache_clear()


def post_worker_init(worker: Any) -> None:
    """Give a uvicorn worker the connection guard (deadlines, header and connection caps) and
    a shutdown that serves the connections still queued on its sockets."""
    from digitflow_fastapi.config import get_settings
    from digitflow_fastapi.lifecycle import listener_drain
    from digitflow_fastapi.lifecycle.connection_guard import (
        ConnectionLimits,
        GuardedHttpToolsProtocol,
    )

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
    """Stop the registry poller; remove the folders this module created."""
    if _watcher is not None and _watcher.poll() is None:  # not yet reaped (by us or the arbiter)
        with contextlib.suppress(OSError):
            os.kill(_watcher.pid, signal.SIGTERM)  # it also exits once the master is gone
    if _made_metrics_dir is not None:
        shutil.rmtree(_made_metrics_dir, ignore_errors=True)
    if _made_model_state_dir is not None:
        shutil.rmtree(_made_model_state_dir, ignore_errors=True)
