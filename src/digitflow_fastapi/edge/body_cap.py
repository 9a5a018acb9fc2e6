"""The per-request body cap (`MAX_UPLOAD_BYTES`): the one check, for the declared length at the
edge and for the bytes as the routes read them (a chunked body declares none)."""

from __future__ import annotations

from digitflow_fastapi.errors import RequestError

SETTING = "MAX_UPLOAD_BYTES"


def check_received_bytes(received: int, max_bytes: int) -> None:
    """Raise 413 once a body read so far (`received` bytes) is over the cap."""
    if received > max_bytes:
        raise RequestError(413, f"request body exceeds {SETTING} ({max_bytes})")


def check_declared_length(value: bytes | None, max_bytes: int) -> None:
    """Raise 413 for a Content-Length over the cap, 400 for an invalid one; the answer closes
    the connection (the body is not read)."""
    if value is None:
        return
    try:
        length = int(value)
    except ValueError:
        length = -1
    close = {"Connection": "close"}
    if length < 0:
        raise RequestError(400, "invalid Content-Length header", headers=close)
    if length > max_bytes:
        detail = (
            f"request body of {value.decode('latin-1')[:20]} bytes exceeds {SETTING} ({max_bytes})"
        )
        raise RequestError(413, detail, headers=close)
