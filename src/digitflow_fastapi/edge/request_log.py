"""Request ids and the one JSON line per request written by the ASGI edge (`asgi.LeanFastAPI`).

An incoming `X-Request-ID` of 1–128 characters from `[A-Za-z0-9._:-]` is kept; anything else is
replaced by a new id: a random per-process prefix and a counter (0.4 µs; `uuid4` costs 2 µs).
Endpoints that predict report the image count, the labels and the model that answered through
`note_predictions`, which fills the record of the request being handled (a context variable).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import secrets
import time
import weakref
from collections.abc import Iterable, MutableMapping
from contextvars import ContextVar
from typing import Any

logger = logging.getLogger("digitflow_fastapi.access")

REQUEST_ID_HEADER = b"x-request-id"
_VALID_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})  # logged at DEBUG
MAX_LOGGED_CHARS = 200


class RequestRecord:
    """What the request log line says about one request, filled in while it is handled."""

    __slots__ = ("model_uuid", "predictions", "rejected_id", "request_id", "status")

    def __init__(self, request_id: str, rejected_id: str | None) -> None:
        self.request_id = request_id
        self.rejected_id = rejected_id
        self.status = 499  # nginx's "client closed request": no answer was sent
        self.predictions: list[int] | None = None
        self.model_uuid: str | None = None


current_record: ContextVar[RequestRecord | None] = ContextVar("digitflow_request", default=None)


def note_predictions(labels: Iterable[int], model_uuid: str) -> None:
    """Record the predicted labels and the answering model on the current request's log line."""
    record = current_record.get()
    if record is not None:
        record.predictions = list(labels)
        record.model_uuid = model_uuid


def loggable(text: str) -> str:
    """A client string safe for any log format: at most 200 characters, non-printable escaped."""
    text = text[:MAX_LOGGED_CHARS]
    if text.isascii() and text.isprintable():
        return text
    return ascii(text)[1:-1]


class RequestIds:
    """Keeps a valid incoming id, else makes one unique to this process (forks included).

    A forked child takes a new prefix at the fork (`os.register_at_fork`), so making an id costs
    no system call."""

    def __init__(self) -> None:
        self._renew()
        renew = weakref.WeakMethod(self._renew)
        os.register_at_fork(after_in_child=lambda: (method := renew()) and method())

    def _renew(self) -> None:
        self._prefix = secrets.token_hex(6)
        self._counter = itertools.count(1)

    def new(self) -> str:
        return f"{self._prefix}-{next(self._counter):x}"

    def take(self, incoming: bytes | None) -> tuple[str, str | None]:
        """(the id to use, the refused incoming value made loggable, if one was refused)."""
        if incoming is None:
            return self.new(), None
        if _VALID_ID.fullmatch(incoming):
            return incoming.decode("ascii"), None
        return self.new(), loggable(incoming[:MAX_LOGGED_CHARS].decode("latin-1"))


def write_request_line(
    scope: MutableMapping[str, Any], record: RequestRecord, started: float, served_uuid: str | None
) -> None:
    """The request's JSON line (logger `digitflow_fastapi.access`); probes and scrapes at DEBUG."""
    path: str = scope["path"]
    level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
    if not logger.isEnabledFor(level):
        return
    path = loggable(path)
    method: str = scope["method"]
    predictions = record.predictions
    fields: dict[str, Any] = {
        "request_id": record.request_id,
        "method": method,
        "path": path,
        "status": record.status,
        "images": 0 if predictions is None else len(predictions),
        "predictions": predictions,
        "latency_ms": round((time.perf_counter() - started) * 1000.0, 3),
        "pid": os.getpid(),
        "model_uuid": record.model_uuid or served_uuid,
    }
    if record.rejected_id is not None:
        fields["rejected_request_id"] = record.rejected_id
    # makeRecord + handle: as `logger.log` without looking up the caller's frame (~3 µs).
    line = logger.makeRecord(
        logger.name,
        level,
        __file__,
        0,
        "%s %s %d",
        (method, path, record.status),
        None,
        extra=fields,
    )
    logger.handle(line)
