"""Uploads → model inputs, scheduled by the pixels each image declares and by its byte size.

A 27 KB PNG can declare 3200×3200 16-bit pixels and a 136-byte WebP a 4472² canvas: byte size says
nothing about decode cost. Pixel count says nothing about parse cost either: a 10 MiB PNG of 28²
pixels can hold 800K empty chunks, a JPEG millions of markers
(`digitflow.inference.image_structure` refuses more than `max_segments`, but parsing up to that
is still work). So each image's header is read first (for PNG straight from its IHDR chunk, the
hot path; others through `preprocess.probe_image`, off the loop past the request's inline byte
budget), then:

- a request whose images would fill more than `max_request_work_pixels` is refused (413);
- small images (together ≤ `INLINE_WORK_PIXELS` and ≤ `inline_bytes`, e.g. 64 MNIST PNGs) are
  decoded on the event loop: cheaper than a thread hop. `decode_later` leaves a request made
  only of those to its batch (`DeferredBatch`, see `MicroBatcher.predict_deferred`), checked
  but not yet decoded;
- the others in a worker thread, so the loop keeps answering;
- a large one (> `LARGE_WORK_PIXELS`) also needs one of `large_slots` per worker: when all are
  taken the request gets 503 with `Retry-After` at once, which bounds the memory of concurrent
  large decodes.

Per-image limits (`max_pixels` declared, `max_work_pixels` decoded, `max_segments` of structure)
are enforced by `preprocess.decode_image` before any pixel is decoded; `max_components` bounds
the digit locator's work on noise (past it the image reads as one without a digit).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import numpy.typing as npt
from starlette.concurrency import run_in_threadpool

from digitflow.errors import ImageTooLarge, InvalidImage
from digitflow.inference.image_structure import DEFAULT_MAX_SEGMENTS
from digitflow.inference.limits import DEFAULT_MAX_COMPONENTS
from digitflow.inference.preprocess import bytes_to_input, probe_image
from digitflow_fastapi.config import DEFAULT_INLINE_DECODE_BYTES
from digitflow_fastapi.errors import RequestError, status_for

FloatBatch = npt.NDArray[np.float32]
Decode = Callable[[bytes, int, int], npt.NDArray[np.float32]]

INLINE_WORK_PIXELS = 256 * 256
LARGE_WORK_PIXELS = 1024 * 1024
_PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"


def declared_work_pixels(data: bytes, max_segments: int = DEFAULT_MAX_SEGMENTS) -> int:
    """Pixels decoding `data` would fill, from its header; raises InvalidImage.

    Constant time for a PNG (its IHDR); other formats are parsed up to their image data, which
    grows with the file: probe those off the loop past the inline byte budget."""
    if data.startswith(_PNG_HEAD) and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return int(width) * int(height)
    return probe_image(data, max_segments).work_pixels


def _probe_or_refusal(data: bytes, max_segments: int) -> int | InvalidImage:
    if not data:
        return InvalidImage("the file is empty")
    try:
        return declared_work_pixels(data, max_segments)
    except InvalidImage as exc:
        return exc


def _probe_all(blobs: Sequence[bytes], max_segments: int) -> list[int | InvalidImage]:
    return [_probe_or_refusal(blob, max_segments) for blob in blobs]


@dataclass(frozen=True)
class DecodeLimits:
    """Per-image, per-request and per-worker decode limits (see the module docstring); the
    server builds them from its settings (`digitflow_fastapi.app.decode_limits`)."""

    max_pixels: int
    max_work_pixels: int
    max_request_work_pixels: int
    large_slots: int
    inline_bytes: int = DEFAULT_INLINE_DECODE_BYTES
    max_segments: int = DEFAULT_MAX_SEGMENTS
    max_components: int = DEFAULT_MAX_COMPONENTS


@dataclass(frozen=True)
class DeferredBatch:
    """`count` checked images that `decode()` turns into N×28×28 float32 when their batch runs;
    it raises `RequestError` naming the image that does not decode."""

    count: int
    decode: Callable[[], FloatBatch]


class ImageDecoder:
    """One per worker: decodes a request's uploads within the limits, in order."""

    def __init__(self, limits: DecodeLimits, decode: Decode | None = None) -> None:
        self.limits = limits
        self._decode: Decode = decode or partial(
            bytes_to_input,
            max_segments=limits.max_segments,
            max_components=limits.max_components,
        )
        self._large_in_progress = 0

    async def decode_all(
        self, blobs: Sequence[bytes], label_of: Callable[[int], str]
    ) -> FloatBatch:
        """N×28×28 float32 inputs; a refusal names the image (`label_of(index)`)."""
        return await self._decode_checked(blobs, await self._checked(blobs, label_of), label_of)

    async def decode_later(
        self, blobs: Sequence[bytes], label_of: Callable[[int], str]
    ) -> DeferredBatch:
        """The same checks as `decode_all` now; the decoding itself left to the batch when every
        image would be decoded on the loop anyway, else done now."""
        pixels = await self._checked(blobs, label_of)
        if sum(pixels) <= INLINE_WORK_PIXELS and sum(map(len, blobs)) <= self.limits.inline_bytes:
            return DeferredBatch(len(blobs), partial(self._decode_inline, blobs, label_of))
        inputs = await self._decode_checked(blobs, pixels, label_of)
        return DeferredBatch(len(inputs), lambda: inputs)

    def _decode_inline(self, blobs: Sequence[bytes], label_of: Callable[[int], str]) -> FloatBatch:
        limits = self.limits
        inputs = []
        for index, blob in enumerate(blobs):
            try:
                inputs.append(self._decode(blob, limits.max_pixels, limits.max_work_pixels))
            except InvalidImage as exc:
                raise RequestError(status_for(exc), f"{label_of(index)}: {exc}") from exc
        return _stacked(inputs)

    async def _checked(self, blobs: Sequence[bytes], label_of: Callable[[int], str]) -> list[int]:
        """Each image's decode cost in pixels, after the per-image and per-request limits."""
        limits = self.limits
        costs = await self._probe(blobs)
        for index, cost in enumerate(costs):
            try:
                if isinstance(cost, InvalidImage):
                    raise cost
                if cost > limits.max_work_pixels:
                    raise ImageTooLarge(
                        f"decoding it would fill {cost} pixels; the limit is "
                        f"{limits.max_work_pixels} (MAX_DECODE_PIXELS)"
                    )
            except InvalidImage as exc:
                raise RequestError(status_for(exc), f"{label_of(index)}: {exc}") from exc
        pixels = [cost for cost in costs if not isinstance(cost, InvalidImage)]
        total = sum(pixels)
        if total > limits.max_request_work_pixels:
            raise RequestError(
                413,
                f"the images of this request would decode to {total} pixels; the limit is "
                f"{limits.max_request_work_pixels} (MAX_REQUEST_DECODE_PIXELS)",
            )
        return pixels

    async def _decode_checked(
        self, blobs: Sequence[bytes], pixels: list[int], label_of: Callable[[int], str]
    ) -> FloatBatch:
        limits = self.limits
        inputs = []
        inline_pixels = inline_bytes = 0
        for index, (blob, cost) in enumerate(zip(blobs, pixels, strict=True)):
            inline_pixels += cost
            inline_bytes += len(blob)
            inline = inline_pixels <= INLINE_WORK_PIXELS and inline_bytes <= limits.inline_bytes
            try:
                inputs.append(await self._decode_one(blob, cost, inline))
            except InvalidImage as exc:
                raise RequestError(status_for(exc), f"{label_of(index)}: {exc}") from exc
        return _stacked(inputs)

    async def _probe(self, blobs: Sequence[bytes]) -> list[int | InvalidImage]:
        """Each image's decode cost or refusal: PNG headers and the first `inline_bytes` of
        other images on the loop, the rest in one worker-thread hop."""
        limits = self.limits
        costs: list[int | InvalidImage] = []
        budget = limits.inline_bytes
        for index, blob in enumerate(blobs):
            if not blob.startswith(_PNG_HEAD):
                budget -= len(blob)
                if budget < 0:
                    rest = await run_in_threadpool(_probe_all, blobs[index:], limits.max_segments)
                    return costs + rest
            costs.append(_probe_or_refusal(blob, limits.max_segments))
        return costs

    async def _decode_one(self, blob: bytes, cost: int, inline: bool) -> npt.NDArray[np.float32]:
        limits = self.limits
        if inline:
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


def _stacked(inputs: list[npt.NDArray[np.float32]]) -> FloatBatch:
    return inputs[0][np.newaxis] if len(inputs) == 1 else np.stack(inputs)
