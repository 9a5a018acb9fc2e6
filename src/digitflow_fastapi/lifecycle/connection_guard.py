"""Connection deadlines and caps in front of the app, installed into every uvicorn worker.

uvicorn's HTTP protocol (httptools) gives a connection that sends nothing, or sends its headers
or body a byte at a time, all the time it wants, and it ignores gunicorn's `limit_request_*`.
`GuardedHttpToolsProtocol` adds, per connection:

- a header deadline: the request line and headers must arrive within `header_timeout` seconds of
  the connection opening (or of the previous response); a silent connection is closed, a slow one
  gets 408;
- a body deadline: the body must arrive within `body_timeout` seconds of the headers (408);
- caps on header bytes (request line included) and header count (431); bytes are also counted as
  they arrive, so a header value (or URL, or chunked-body trailer) sent without its line end is
  refused once it passes the cap instead of growing in httptools' buffer until memory runs out;
- a per-worker connection cap: a connection over it gets 503 with `Retry-After` at once;
- a graceful drain: on shutdown an idle keep-alive connection stays open for `drain_seconds`, so
  a request already on its way is answered (with `Connection: close`) instead of being dropped.

A response leaves in one write: the head uvicorn writes first is held until the body's first
write (or the end of the response, or a close) and sent with it, so a small JSON answer is one
syscall and one TCP segment instead of two (`_OneWriteTransport`).

It also tells the app how many connections its worker holds (`open_connections`): the batcher
runs a lone client's forward pass inline only when this is the worker's one connection.

`gunicorn_conf.post_worker_init` installs it with the values of `Settings`, so the seed's command
(`-k uvicorn.workers.UvicornWorker`) and `digitflow serve` both get it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol


@dataclass(frozen=True)
class ConnectionLimits:
    """The guard's settings (see the module docstring): the first five from `Settings`
    (HEADER_TIMEOUT_S, BODY_TIMEOUT_S, MAX_HEADER_BYTES, MAX_HEADER_COUNT,
    MAX_CONNECTIONS_PER_WORKER), their one home."""

    header_timeout: float
    body_timeout: float
    max_header_bytes: int
    max_header_count: int
    max_connections: int
    drain_seconds: float = 1.0
    retry_after_seconds: int = 1

    @property
    def head_allowance(self) -> int:
        """Raw bytes an unfinished head may reach before it is refused.

        `max_header_bytes` counts the target and the header names and values; the raw head
        also holds the method, the version, separators and optional whitespace, hence the
        margin (twice the cap plus 8 bytes a header), still far below anything that hurts.
        """
        return 2 * self.max_header_bytes + 8 * self.max_header_count


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; the answer is in `_refusal`."""


def raw_json_response(status: int, detail: str, extra_headers: tuple[bytes, ...] = ()) -> bytes:
    """A complete `Connection: close` HTTP/1.1 response with a JSON `{"detail": ...}` body."""
    body = orjson.dumps({"detail": detail})
    head = [
        STATUS_LINE[status],
        b"content-type: application/json\r\n",
        b"content-length: " + str(len(body)).encode() + b"\r\n",
        b"connection: close\r\n",
        *extra_headers,
        b"\r\n",
    ]
    return b"".join(head) + body


class _OneWriteTransport:
    """The transport a request cycle writes to: holds the response head (uvicorn writes it on
    `http.response.start`) until the next write, close or the response's end, then sends it
    with what follows in one write. `100 Continue` and anything else pass straight through."""

    __slots__ = ("_head", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._head is not None:
            data, self._head = self._head + data, None
        elif data.startswith(b"HTTP/1.1 ") and not data.startswith(b"HTTP/1.1 100 "):
            self._head = data
            return
        self._transport.write(data)

    def flush(self) -> None:
        """Send a held head (a response without body writes: HEAD, or one that ended)."""
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


_worker_connections: set[Any] = set()  # uvicorn's per-server set, shared by its connections


def open_connections() -> int:
    """The connections this worker holds open (0 when the guard is not installed)."""
    return len(_worker_connections)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines, header caps and a connection cap."""

    limits: ClassVar[ConnectionLimits]  # bound by `configured`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._header_count = 0
        self._refusal: bytes | None = None
        self._draining = False
        self._request_started = False
        self._progress = False  # the parser reached a header end, body bytes or a message end
        self._unframed_bytes = 0  # bytes fed since it last did
        self._one_write: _OneWriteTransport | None = None
        self._body_pending = False  # headers done, body still to come: arm its deadline
        # uvicorn builds its access line's arguments (URL quoting) whenever the logger has a
        # handler anywhere up its tree, even at a level that drops the line: ~1 µs a request.
        self.access_log = self.access_log and self.access_logger.isEnabledFor(logging.INFO)

    @classmethod
    def configured(cls, limits: ConnectionLimits) -> type[GuardedHttpToolsProtocol]:
        """A subclass bound to `limits` (what uvicorn's `Config.http` is given)."""
        return type(cls.__name__, (cls,), {"limits": limits})

    # deadlines -----------------------------------------------------------------------------
    def _arm(self, seconds: float, handler: Any) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, handler)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _refuse(self, status: int, detail: str, extra: tuple[bytes, ...] = ()) -> None:
        """Answer `status` and close, unless a response is already under way."""
        self._disarm()
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(raw_json_response(status, detail, extra))
        if self.cycle is not None:  # the app's receive() now reports a disconnect
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    def _on_header_deadline(self) -> None:
        self._deadline = None
        if not self._request_started:
            self.transport.close()  # idle: nothing to answer
            return
        seconds = self.limits.header_timeout
        self._refuse(408, f"request headers not received within {seconds:g} s")

    def _on_body_deadline(self) -> None:
        self._deadline = None
        self._refuse(408, f"request body not received within {self.limits.body_timeout:g} s")

    # protocol and parser callbacks ---------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        global _worker_connections
        super().connection_made(transport)
        _worker_connections = self.connections
        if len(self.connections) > self.limits.max_connections:
            retry = f"retry-after: {self.limits.retry_after_seconds}\r\n".encode()
            transport.write(
                raw_json_response(503, "too many connections to this worker; retry", (retry,))
            )
            transport.close()
            return
        self._arm(self.limits.header_timeout, self._on_header_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed the parser, then refuse a head (or trailer) that grows past the cap unfinished.

        httptools reports a header (and `on_header` counts it) only once its line ends, and
        keeps appending the pieces of an unfinished one to one growing buffer. So every feed
        in which the parser completes nothing (no header end, no body bytes, no message end)
        is counted here; the count restarts whenever it does. A connection can thus hold at
        most `head_allowance` bytes plus one read of unfinished head.
        """
        self._progress = False
        super().data_received(data)
        if self._body_pending:
            # Armed only when a feed ends with the body unfinished: a body that came with its
            # headers (most requests) costs no timer.
            self._body_pending = False
            cycle = self.cycle
            if cycle is not None and cycle.more_body and not self.transport.is_closing():
                self._arm(self.limits.body_timeout, self._on_body_deadline)
        if self._progress:
            self._unframed_bytes = 0
            return
        if self.transport.is_closing():
            return
        self._unframed_bytes += len(data)
        if self._unframed_bytes > self.limits.head_allowance:
            self._refuse(
                431, f"request line and headers exceed {self.limits.max_header_bytes} bytes"
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_started = True
        self._header_bytes = 0
        self._header_count = 0
        if self._deadline is None:
            self._arm(self.limits.header_timeout, self._on_header_deadline)

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._count_header_bytes(len(name) + len(value))
        if self._header_count > self.limits.max_header_count:
            self._refusal = raw_json_response(
                431, f"more than {self.limits.max_header_count} request headers"
            )
            raise _Refused
        super().on_header(name, value)

    def _count_header_bytes(self, count: int) -> None:
        self._header_bytes += count
        if self._header_bytes > self.limits.max_header_bytes:
            self._refusal = raw_json_response(
                431, f"request line and headers exceed {self.limits.max_header_bytes} bytes"
            )
            raise _Refused

    def send_400_response(self, msg: str) -> None:
        """Called by uvicorn when parsing fails; a cap refusal answers 431 instead of 400."""
        if self._refusal is None:
            super().send_400_response(msg)
            return
        self._disarm()
        self.transport.write(self._refusal)
        self.transport.close()

    def on_headers_complete(self) -> None:
        self._progress = True
        self._disarm()
        super().on_headers_complete()
        if self.cycle is not None:
            if self._one_write is None:
                self._one_write = _OneWriteTransport(self.transport)
            self.cycle.transport = self._one_write  # type: ignore[assignment]
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False
        self._body_pending = self.cycle is not None and self._expects_body()

    def _expects_body(self) -> bool:
        for name, value in self.headers:
            if name == b"content-length":
                return value.strip() not in (b"0", b"")
            if name == b"transfer-encoding":
                return True
        return False

    def on_body(self, body: bytes) -> None:
        self._progress = True
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._progress = True
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self._request_started = False
        if self._one_write is not None:
            self._one_write.flush()
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._arm(self.limits.header_timeout, self._on_header_deadline)

    def shutdown(self) -> None:
        """Graceful stop: finish the request in flight; give an idle connection a moment."""
        self._draining = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
            return
        if self._request_started:
            return  # headers on their way: on_headers_complete turns keep-alive off
        self._arm(self.limits.drain_seconds, self._close_idle)

    def _close_idle(self) -> None:
        self._deadline = None
        if not self._request_started and not self.transport.is_closing():
            self.transport.close()
