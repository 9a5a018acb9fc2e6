"""Loaded by gunicorn from `src/` (the seed's command) and by `digitflow serve`.

- Tells workers how many siblings they have, so each sizes its thread pool to cores // workers.
- `reuse_port`: each worker binds its own SO_REUSEPORT listening socket and the kernel spreads
  new connections evenly over them. With one shared socket, whichever worker is idle at that
  instant accepts them all (measured: 64 of 64 keep-alive connections on one of two workers,
  -30% throughput). Caveat: connections still queued on a worker's socket when that worker
  exits are reset, and clients retry.
"""

import os
from typing import Any

reuse_port = True


def on_starting(server: Any) -> None:
    """Export the worker count so each worker sizes its torch thread pool to cores // workers."""
    os.environ.setdefault("WEB_CONCURRENCY", str(server.cfg.workers))
