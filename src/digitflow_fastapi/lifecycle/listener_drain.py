"""A stopping worker serves the connections still queued on its listening sockets.

With `REUSE_PORT` (the default) each worker listens on a socket of its own and the kernel queues
new connections on each. uvicorn's shutdown closes those sockets first, and a connection the
kernel had already completed but the worker had not accepted yet is reset: measured, 21 failed
requests over 3 worker stops with 24 clients opening a connection per request, and 2 lost when
the whole server got SIGTERM.

`DrainingServer.shutdown` accepts whatever is queued and closes the sockets in the same instant
(no `await` in between, so the event loop cannot fall behind again), then hands the accepted
connections to the HTTP protocol like any other; uvicorn's own shutdown follows, so their
requests are answered with `Connection: close` before the worker exits. What is left is the few
microseconds between the last `accept` and the `close`; Linux closes that too with the sysctl
`net.ipv4.tcp_migrate_req=1`, which moves a closing socket's queue to a sibling.

`install(worker)` (from `gunicorn_conf.post_worker_init`) makes the worker build this server
instead of uvicorn's, for any worker class that creates `uvicorn.server.Server` in its module.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import Sequence
from typing import Any

from uvicorn.server import Server

logger = logging.getLogger(__name__)

MAX_HANDED_OVER = 4096  # per socket: a bound on the loop under a flood; the kernel backlog is 2048


def accept_queued(listeners: Sequence[Any], limit: int = MAX_HANDED_OVER) -> list[socket.socket]:
    """Every connection already queued on `listeners` (sockets or gunicorn's socket wrappers)."""
    accepted: list[socket.socket] = []
    for listener in listeners:
        sock: socket.socket = getattr(listener, "sock", None) or listener
        if sock.fileno() < 0:
            continue
        sock.setblocking(False)
        for _ in range(limit):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # the socket is gone: nothing more to take
                logger.debug("accept during shutdown failed: %s", exc)
                break
            conn.setblocking(False)
            accepted.append(conn)
    return accepted


class DrainingServer(Server):
    """uvicorn's server, but queued connections are served on shutdown instead of reset."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        queued = accept_queued(sockets or [])
        for server in getattr(self, "servers", []):
            server.close()  # right after the last accept: nothing new can queue in between
        if queued:
            logger.info("serving %d connection(s) queued at shutdown", len(queued))
            await self._serve_accepted(queued)
        await super().shutdown(sockets)

    async def _serve_accepted(self, connections: list[socket.socket]) -> None:
        """Give each connection the HTTP protocol uvicorn gives the ones it accepts itself."""
        config, loop = self.config, asyncio.get_running_loop()

        def protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        for conn in connections:
            try:
                await loop.connect_accepted_socket(protocol, conn)
            except OSError as exc:  # the client gave up meanwhile
                logger.debug("a queued connection closed before it was served: %s", exc)
                conn.close()


def install(worker: Any) -> bool:
    """Make `worker` (a gunicorn uvicorn worker) run `DrainingServer`; False if it cannot."""
    for cls in type(worker).__mro__:
        module = sys.modules.get(cls.__module__)
        if module is not None and getattr(module, "Server", None) is Server:
            module.Server = DrainingServer  # type: ignore[attr-defined]
            return True
    return False
