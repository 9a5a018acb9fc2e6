"""The connection guard's per-request bookkeeping, on uvicorn's real protocol with an in-memory
transport: the body deadline is armed only while a body is unfinished, and uvicorn's access
line is built only when its logger would print it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from digitflow_fastapi.lifecycle.connection_guard import ConnectionLimits, GuardedHttpToolsProtocol

BODY_TIMEOUT = 7.5
LIMITS = ConnectionLimits(
    header_timeout=5.0,
    body_timeout=BODY_TIMEOUT,
    max_header_bytes=8192,
    max_header_count=20,
    max_connections=10,
)
HEAD = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"


class Wire(asyncio.Transport):
    """Collects what the protocol writes."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _app(scope: Any, receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def uvicorn_access() -> Iterator[logging.Logger]:
    logger = logging.getLogger("uvicorn.access")
    level, handlers = logger.level, logger.handlers[:]
    logger.addHandler(logging.NullHandler())  # as under the servers' logging config
    yield logger
    logger.setLevel(level)
    logger.handlers[:] = handlers


async def _feed(*chunks: bytes) -> tuple[list[float], GuardedHttpToolsProtocol, Wire]:
    """Feed `chunks` to a fresh guarded protocol; the delays of the timers it set meanwhile."""
    loop = asyncio.get_running_loop()
    config = Config(app=_app, lifespan="off", log_config=None)
    config.load()
    protocol = GuardedHttpToolsProtocol.configured(LIMITS)(config, ServerState(), {}, loop)
    wire = Wire()
    protocol.connection_made(wire)
    delays: list[float] = []
    call_later = loop.call_later

    def recording(delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        delays.append(delay)
        return call_later(delay, callback, *args)

    loop.call_later = recording  # type: ignore[method-assign]
    try:
        for chunk in chunks:
            protocol.data_received(chunk)
    finally:
        loop.call_later = call_later  # type: ignore[method-assign]
    return delays, protocol, wire


def test_a_body_that_came_with_its_headers_sets_no_body_deadline() -> None:
    async def run() -> None:
        delays, protocol, _ = await _feed(HEAD + b"0123456789")
        assert BODY_TIMEOUT not in delays
        assert protocol._deadline is None  # the header deadline waits for the response
        protocol.connection_lost(None)

    asyncio.run(run())


def test_a_body_still_unfinished_after_a_feed_gets_its_deadline_until_it_is_complete() -> None:
    async def run() -> None:
        delays, protocol, _ = await _feed(HEAD + b"01234")
        assert delays.count(BODY_TIMEOUT) == 1
        assert protocol._deadline is not None
        protocol.data_received(b"56789")
        assert protocol._deadline is None  # the message is complete: no deadline until answered
        protocol.connection_lost(None)

        delays, protocol, _ = await _feed(HEAD, b"0123456789")  # the body in a feed of its own
        assert delays.count(BODY_TIMEOUT) == 1
        assert protocol._deadline is None
        protocol.connection_lost(None)

    asyncio.run(run())


@pytest.mark.parametrize(("level", "built"), [(logging.WARNING, False), (logging.INFO, True)])
def test_the_access_line_is_built_only_when_uvicorn_access_would_print_it(
    uvicorn_access: logging.Logger, level: int, built: bool
) -> None:
    uvicorn_access.setLevel(level)

    async def run() -> None:
        _, protocol, wire = await _feed(HEAD + b"0123456789")
        assert protocol.access_log is built
        await asyncio.sleep(0.05)
        assert wire.written.startswith(b"HTTP/1.1 200 OK")
        protocol.connection_lost(None)

    asyncio.run(run())
