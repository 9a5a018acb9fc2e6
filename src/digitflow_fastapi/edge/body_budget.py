"""A per-worker budget for request-body bytes held in memory.

Each request's body is capped (`MAX_UPLOAD_BYTES`) and each worker holds at most
`MAX_IN_FLIGHT_PER_WORKER` requests, but the product (128 × 10 MiB) is more than a pod has:
60 connections holding 10 MiB bodies one byte short took a worker from 198 to 801 MiB. So every
body chunk the app receives is charged to one counter per worker, and released when its request
ends. A chunk that would push the worker past `MAX_BUFFERED_BODY_BYTES_PER_WORKER` is refused:
503 with `Retry-After`, not 413, because the request itself is within the limits; the worker is
momentarily full and the same request succeeds on a retry (here, or on another pod).

One worker is one event loop: the counter needs no lock. The edge calls `metered` around every
HTTP request:

    with metered(receive, budget_of(app.state)) as receive:
        ...  # route the request with the metered receive
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from digitflow_fastapi.errors import RequestError

logger = logging.getLogger(__name__)

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]

SETTING = "MAX_BUFFERED_BODY_BYTES_PER_WORKER"
RETRY_AFTER_SECONDS = 1


class BodyBudget:
    """Bytes of request bodies this worker holds, against a limit."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("the body budget must be positive")
        self.limit = limit
        self.used = 0

    def charge(self, count: int) -> None:
        """Take `count` bytes, or raise 503 (`RequestError`) if they do not fit."""
        if self.used + count > self.limit:
            logger.info(
                "body budget full: %d of %d bytes held, %d more refused",
                self.used,
                self.limit,
                count,
            )
            raise RequestError(
                503,
                f"this worker holds {self.used} bytes of request bodies and this request would "
                f"pass its budget ({SETTING}={self.limit}); retry",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        self.used += count

    def release(self, count: int) -> None:
        """Give back `count` bytes charged earlier."""
        self.used -= count


class metered:  # noqa: N801 - used as a function: `with metered(receive, budget) as receive:`
    """`receive`, with every `http.request` chunk charged to `budget` until the block exits.

    A chunk that does not fit is dropped and its `RequestError` (503) raised from `receive`,
    so the route answers it like any other client error. With `budget` None, `receive` as is.
    A class rather than a generator context manager: it runs on every request (2.1 → 0.6 µs).
    """

    __slots__ = ("_budget", "_charged", "_open", "_receive")

    def __init__(self, receive: Receive, budget: BodyBudget | None) -> None:
        self._receive = receive
        self._budget = budget
        self._charged = 0
        self._open = True

    def __enter__(self) -> Receive:
        return self._receive if self._budget is None else self._charged_receive

    def __exit__(self, *_: object) -> None:
        self._open = False  # a late receive (a task outliving the request) is not charged
        if self._budget is not None:
            self._budget.release(self._charged)
            self._charged = 0

    async def _charged_receive(self) -> Message:
        message = await self._receive()
        if self._open and message["type"] == "http.request":
            size = len(message.get("body", b""))
            if size and self._budget is not None:
                self._budget.charge(size)
                self._charged += size
        return message


def budget_of(state: Any) -> BodyBudget | None:
    """The app's budget, made on first use from `state.settings` (None without settings)."""
    budget: BodyBudget | None = getattr(state, "body_budget", None)
    if budget is None:
        settings = getattr(state, "settings", None)
        limit = getattr(settings, SETTING, None)
        if not isinstance(limit, int):
            return None
        budget = BodyBudget(limit)
        state.body_budget = budget
    return budget
