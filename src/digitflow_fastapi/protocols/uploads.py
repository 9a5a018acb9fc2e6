"""Reads a multipart body once, in memory, with caps on bytes and parts (nothing touches disk)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import lru_cache

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from digitflow_fastapi.edge.body_cap import check_received_bytes
from digitflow_fastapi.errors import RequestError


@dataclass
class Part:
    """One form part: its field name, the client's filename (if any) and its bytes.

    `data` grows in place while the body is parsed, then is frozen into `bytes` (`_freeze`),
    so the routes get `bytes` without a second copy of every part held next to the first.
    """

    name: str
    filename: str | None
    data: bytes | bytearray = field(default_factory=bytearray)


class _Collector:
    def __init__(self, max_parts: int) -> None:
        self.parts: list[Part] = []
        self.max_parts = max_parts
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._current: Part | None = None

    def on_part_begin(self) -> None:
        self._headers = {}
        self._current = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        raw_filename = options.get(b"filename")
        filename = raw_filename.decode("utf-8", "replace") if raw_filename is not None else None
        if len(self.parts) >= self.max_parts:
            raise RequestError(
                413, f"too many form parts: at most {self.max_parts} files per request"
            )
        self._current = Part(name=name, filename=filename)
        self.parts.append(self._current)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is not None:
            self._current.data += data[start:end]


def _freeze(parts: list[Part]) -> list[Part]:
    """Turn each part's buffer into `bytes`, one part at a time (the buffer is freed at once),
    so memory peaks at the body plus its largest part, not twice the body; `bytes(part.data)`
    then returns the same object."""
    for part in parts:
        part.data = bytes(part.data)
    return parts


@lru_cache(maxsize=256)
def _parse_content_type(content_type: str) -> tuple[bytes, dict[bytes, bytes]]:
    """Media type and options of a Content-Type header (clients repeat the same few)."""
    return parse_options_header(content_type)


async def read_multipart(
    content_type: str | None, stream: AsyncIterator[bytes], max_bytes: int, max_parts: int
) -> list[Part]:
    """Parse a multipart/form-data body held in memory; raises RequestError with a 4xx."""
    if not content_type:
        raise RequestError(415, "Content-Type must be multipart/form-data (none given)")
    media_type, options = (
        _parse_content_type(content_type)
        if len(content_type) <= 256
        else parse_options_header(content_type)
    )
    if media_type != b"multipart/form-data":
        raise RequestError(
            415,
            f"Content-Type must be multipart/form-data, not {media_type.decode('latin-1')[:60]!r}",
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise RequestError(400, "multipart/form-data body without a boundary")
    collector = _Collector(max_parts)
    callbacks = {
        "on_part_begin": collector.on_part_begin,
        "on_part_data": collector.on_part_data,
        "on_header_field": collector.on_header_field,
        "on_header_value": collector.on_header_value,
        "on_header_end": collector.on_header_end,
        "on_headers_finished": collector.on_headers_finished,
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in stream:
            received += len(chunk)
            check_received_bytes(received, max_bytes)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise RequestError(400, f"malformed multipart body: {exc}") from exc
    return _freeze(collector.parts)
