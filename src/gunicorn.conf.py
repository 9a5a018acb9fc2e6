"""Loaded by gunicorn from `src/` (the seed's command) and by `digitflow serve`.

- Tells workers how many siblings they have, so each sizes its thread pool to cores // workers.
- `reuse_port`: each worker binds its own SO_REUSEPORT listening socket and the kernel spreads
  new connections evenly over them. With one shared socket, whichever worker is idle at that
  instant accepts them all (measured: 64 of 64 keep-alive connections on one of two workers,
  -30% throughput). Caveat: connections still queued on a worker's socket when that worker
  exits are reset, and clients retry.
- Because SO_REUSEPORT would let a second server on the same port share it silently, the
  master first checks that nothing listens there and stops with a clear message if it does.
"""

import errno
import os
import socket
import sys
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


def on_starting(server: Any) -> None:
    """Refuse a busy port; export the worker count (each worker uses cores // workers threads)."""
    _refuse_busy_ports(list(server.cfg.address))
    os.environ.setdefault("WEB_CONCURRENCY", str(server.cfg.workers))
