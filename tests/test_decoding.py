"""Uploads are scheduled by the pixels they declare: inline, in a thread, or refused."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from digitflow_fastapi.decoding import (
    INLINE_WORK_PIXELS,
    DecodeLimits,
    ImageDecoder,
    declared_work_pixels,
)
from digitflow_fastapi.errors import RequestError

LIMITS = DecodeLimits(
    max_pixels=20_000_000,
    max_work_pixels=4 * 1024 * 1024,
    max_request_work_pixels=8 * 1024 * 1024,
    large_slots=1,
)


def png(width: int, height: int, mode: str = "L") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), 255).save(out, "PNG", optimize=True)
    return out.getvalue()


def test_a_pngs_pixels_are_read_from_its_header() -> None:
    assert declared_work_pixels(png(28, 28)) == 784
    assert declared_work_pixels(png(300, 200, "RGBA")) == 60_000


def test_a_small_file_declaring_a_huge_16_bit_image_is_refused_before_decoding() -> None:
    data = png(3200, 3200, "I;16")
    assert len(data) < 64 * 1024  # small in bytes: byte size says nothing about decode cost
    calls: list[bytes] = []
    decoder = ImageDecoder(LIMITS, decode=lambda b, p, w: calls.append(b) or np.zeros((28, 28)))
    with pytest.raises(RequestError) as refused:
        asyncio.run(decoder.decode_all([data] * 16, lambda i: f"#{i}"))
    assert refused.value.status_code == 413 and "MAX_DECODE_PIXELS" in refused.value.detail
    assert calls == []


def test_a_request_over_the_pixel_budget_is_refused_as_a_whole() -> None:
    side = 1800  # 3.2 MP each: under the per-image cap, three are over the request's 8 Mi
    decoder = ImageDecoder(LIMITS, decode=lambda b, p, w: np.zeros((28, 28), np.float32))
    with pytest.raises(RequestError) as refused:
        asyncio.run(decoder.decode_all([png(side, side)] * 3, lambda i: f"#{i}"))
    assert refused.value.status_code == 413
    assert "MAX_REQUEST_DECODE_PIXELS" in refused.value.detail


def test_small_images_decode_on_the_loop_and_big_ones_in_a_thread() -> None:
    threads: list[int] = []

    def decode(blob: bytes, max_pixels: int, max_work: int) -> npt.NDArray[np.float32]:
        threads.append(threading.get_ident())
        return np.zeros((28, 28), np.float32)

    async def run() -> int:
        decoder = ImageDecoder(LIMITS, decode=decode)
        await decoder.decode_all([png(28, 28), png(600, 600)], lambda i: f"#{i}")
        return threading.get_ident()

    loop_thread = asyncio.run(run())
    assert INLINE_WORK_PIXELS < 600 * 600
    assert threads[0] == loop_thread and threads[1] != loop_thread


def test_large_decodes_beyond_the_slots_get_503_with_retry_after() -> None:
    release = threading.Event()

    def slow(blob: bytes, max_pixels: int, max_work: int) -> npt.NDArray[np.float32]:
        release.wait(10)
        return np.zeros((28, 28), np.float32)

    async def run() -> RequestError:
        decoder = ImageDecoder(LIMITS, decode=slow)
        big = png(1500, 1500)
        first = asyncio.create_task(decoder.decode_all([big], lambda i: "first"))
        await asyncio.sleep(0.2)  # the first holds the only large slot
        try:
            await decoder.decode_all([big], lambda i: "second")
        except RequestError as exc:
            return exc
        finally:
            release.set()
            await first
        raise AssertionError("the second large decode was not refused")

    refused = asyncio.run(run())
    assert refused.status_code == 503
    assert refused.headers == {"Retry-After": "1"}
