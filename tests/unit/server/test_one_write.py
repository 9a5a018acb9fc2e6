"""A response's head and body leave the worker in one write."""

from __future__ import annotations

from typing import Any

from digitflow_fastapi.lifecycle.connection_guard import _OneWriteTransport


class Wire:
    """Records what is written and whether the connection was closed."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


def _transport() -> tuple[_OneWriteTransport, Wire]:
    wire = Wire()
    return _OneWriteTransport(wire), wire  # type: ignore[arg-type]


def test_the_head_is_sent_with_the_body_in_one_write() -> None:
    transport, wire = _transport()
    transport.write(HEAD)
    assert wire.writes == []
    transport.write(b"{}")
    assert wire.writes == [HEAD + b"{}"]
    transport.write(b"more")  # a streamed body's next chunks pass straight through
    assert wire.writes == [HEAD + b"{}", b"more"]


def test_100_continue_is_not_held() -> None:
    transport, wire = _transport()
    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert wire.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]


def test_a_response_without_body_writes_leaves_at_its_end_or_at_close() -> None:
    transport, wire = _transport()
    transport.write(HEAD)
    transport.flush()  # the end of a HEAD answer
    assert wire.writes == [HEAD]
    transport.write(HEAD)
    transport.close()
    assert wire.writes == [HEAD, HEAD] and wire.closed
    assert transport.is_closing()  # everything else is the real transport's


def test_every_other_attribute_is_the_real_transport_s() -> None:
    transport, wire = _transport()
    probe: Any = transport
    assert probe.writes is wire.writes
