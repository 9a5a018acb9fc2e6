"""Loaded by gunicorn from `src/`: tells workers how many siblings they have (thread hygiene)."""

import os
from typing import Any


def on_starting(server: Any) -> None:
    """Export the worker count so each worker sizes its torch thread pool to cores // workers."""
    os.environ.setdefault("WEB_CONCURRENCY", str(server.cfg.workers))
