"""Uploads → model inputs, scheduled by the pixels each image declares, not by its byte size.

A 27 KB PNG can declare 3200×3200 16-bit pixels and a 136-byte WebP a 4472² canvas: byte size says
nothing about decode cost. Each image's header is read first (for PNG straight from its IHDR
chunk, the hot path; others through `preprocess.probe_image`), then:

- a request whose images would fill more than `max_request_work_pixels` is refused (413);
- a small image (≤ `INLINE_WORK_PIXELS`, e.g. an MNIST PNG) is decoded on the event loop: cheaper
  than a thread hop;
- a bigger one in a worker thread, so the loop keeps answering;
- a large one (> `LARGE_WORK_PIXELS`) also needs one of `large_slots` per worker: when all are
  taken the request gets 503 with `Retry-After` at once, which bounds the memory of concurrent
  large decodes.

Per-image limits (`max_pixels` declared, `max_work_pixels` decoded) are enforced by
`preprocess.decode_image` from the header, before any pixel is decoded.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from starlette.concurrency import run_in_threadpool

from digitflow.errors import ImageTooLarge, InvalidImage
from digitflow.preprocess import bytes_to_input, probe_image
from digitflow_fastapi.errors import RequestError, status_for

FloatBatch = npt.NDArray[np.float32]
Decode = Callable[[bytes, int, int], npt.NDArray[np.float32]]

INLINE_WORK_PIXELS = 256 * 256
LARGE_WORK_PIXELS = 1024 * 1024
_PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"


def declared_work_pixels(data: bytes) -> int:
    """Pixels decoding `data` would fill, from its header; raises InvalidImage."""
    if data.startswith(_PNG_HEAD) and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return int(width) * int(height)
    return probe_image(data).work_pixels


@dataclass(frozen=True)
class DecodeLimits:
    """Per-image, per-request and per-worker decode limits (see the module docstring)."""

    max_pixels: int
    max_work_pixels: int
    max_request_work_pixels: int
    large_slots: int


class ImageDecoder:
    """One per worker: decodes a request's uploads within the limits, in order."""

    def __init__(self, limits: DecodeLimits, decode: Decode = bytes_to_input) -> None:
        self.limits = limits
        self._decode = decode
        self._large_in_progress = 0

    async def decode_all(
        self, blobs: Sequence[bytes], label_of: Callable[[int], str]
    ) -> FloatBatch:
        """N×28×28 float32 inputs; a refusal names the image (`label_of(index)`)."""
        costs = []
        for index, blob in enumerate(blobs):
            try:
                if not blob:
                    raise InvalidImage("the file is empty")
                cost = declared_work_pixels(blob)
                if cost > self.limits.max_work_pixels:
                    raise ImageTooLarge(
                        f"decoding it would fill {cost} pixels; the limit is "
                        f"{self.limits.max_work_pixels} (MAX_DECODE_PIXELS)"
                    )
                costs.append(cost)
            except InvalidImage as exc:
                raise RequestError(status_for(exc), f"{label_of(index)}: {exc}") from exc
        total = sum(costs)
        if total > self.limits.max_request_work_pixels:
            raise RequestError(
                413,
                f"the images of this request would decode to {total} pixels; the limit is "
                f"{self.limits.max_request_work_pixels} (MAX_REQUEST_DECODE_PIXELS)",
            )
        inputs = []
        for index, (blob, cost) in enumerate(zip(blobs, costs, strict=True)):
            try:
                inputs.append(await self._decode_one(blob, cost))
            except InvalidImage as exc:
                raise RequestError(status_for(exc), f"{label_of(index)}: {exc}") from exc
        return np.stack(inputs)

    async def _decode_one(self, blob: bytes, cost: int) -> npt.NDArray[np.float32]:
        limits = self.limits
        if cost <= INLINE_WORK_PIXELS:
            return self._decode(blob, limits.max_pixels, limits.max_work_pixels)
        if cost <= LARGE_WORK_PIXELS:
            return await run_in_threadpool(
                self._decode, blob, limits.max_pixels, limits.max_work_pixels
            )
        if self._large_in_progress >= limits.large_slots:
            raise RequestError(
                503,
                f"this worker is already decoding {limits.large_slots} large images "
                "(MAX_LARGE_DECODES_PER_WORKER); retry",
                headers={"Retry-After": "1"},
            )
        self._large_in_progress += 1
        try:
            return await run_in_threadpool(
                self._decode, blob, limits.max_pixels, limits.max_work_pixels
            )
        finally:
            self._large_in_progress -= 1
