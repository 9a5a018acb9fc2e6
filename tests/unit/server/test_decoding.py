"""Uploads are scheduled by the pixels they declare and their bytes: inline, in a thread, or
refused; probes of big non-PNG files run off the loop too."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from digitflow.inference.preprocess import ImageProbe, probe_image
from digitflow_fastapi.app import decode_limits
from digitflow_fastapi.config import DEFAULT_INLINE_DECODE_BYTES, Settings
from digitflow_fastapi.errors import RequestError
from digitflow_fastapi.protocols import decoding
from digitflow_fastapi.protocols.decoding import (
    INLINE_WORK_PIXELS,
    DecodeLimits,
    ImageDecoder,
    declared_work_pixels,
)
from tests.support.image_floods import gif_frame_flood, jpeg_comment_flood, png_chunk_flood

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


def _recording_decoder(threads: list[int], limits: DecodeLimits = LIMITS) -> ImageDecoder:
    def decode(blob: bytes, max_pixels: int, max_work: int) -> npt.NDArray[np.float32]:
        threads.append(threading.get_ident())
        return np.zeros((28, 28), np.float32)

    return ImageDecoder(limits, decode=decode)


def test_a_few_pixels_in_many_bytes_are_decoded_in_a_thread() -> None:
    flood = png_chunk_flood(5_000)  # 28² pixels, 60 KB of empty chunks
    assert declared_work_pixels(flood) == 784 and len(flood) > DEFAULT_INLINE_DECODE_BYTES
    threads: list[int] = []

    async def run() -> int:
        await _recording_decoder(threads).decode_all([png(28, 28), flood], lambda i: f"#{i}")
        return threading.get_ident()

    loop_thread = asyncio.run(run())
    assert threads[0] == loop_thread and threads[1] != loop_thread


def test_the_inline_budget_is_shared_by_the_images_of_a_request() -> None:
    threads: list[int] = []

    async def run(blobs: list[bytes]) -> list[bool]:
        threads.clear()
        await _recording_decoder(threads).decode_all(blobs, lambda i: f"#{i}")
        return [t == threading.get_ident() for t in threads]

    assert asyncio.run(run([png(28, 28)] * 64)) == [True] * 64  # MNIST requests stay inline
    assert asyncio.run(run([png(256, 256)] * 3)) == [True, False, False]


def test_other_formats_past_the_inline_bytes_are_probed_off_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probed: list[int] = []

    def spy(data: bytes, max_segments: int) -> ImageProbe:
        probed.append(threading.get_ident())
        return probe_image(data, max_segments)

    monkeypatch.setattr(decoding, "probe_image", spy)
    small = jpeg_comment_flood(10)
    big = jpeg_comment_flood(9_000)  # 36 KB of markers, under MAX_IMAGE_SEGMENTS
    assert len(small) < DEFAULT_INLINE_DECODE_BYTES < len(big)

    async def run() -> int:
        await _recording_decoder([]).decode_all([small, big, small], lambda i: f"#{i}")
        return threading.get_ident()

    loop_thread = asyncio.run(run())
    assert probed[0] == loop_thread and probed[1] != loop_thread and probed[2] != loop_thread


def test_a_flood_is_refused_with_413_naming_the_image() -> None:
    decoder = ImageDecoder(LIMITS)
    with pytest.raises(RequestError) as refused:
        asyncio.run(decoder.decode_all([png(28, 28), gif_frame_flood(1_000)], lambda i: f"#{i}"))
    assert refused.value.status_code == 413
    assert refused.value.detail == "#1: the image has more than 100 frames; the limit is 100"


def test_the_decode_limits_come_from_the_settings() -> None:
    conf = Settings(INLINE_DECODE_MAX_BYTES=0, MAX_IMAGE_SEGMENTS=7, MAX_DIGIT_COMPONENTS=9)
    limits = decode_limits(conf)
    assert (limits.inline_bytes, limits.max_segments, limits.max_components) == (0, 7, 9)
    assert limits.max_work_pixels == conf.MAX_DECODE_PIXELS
    with pytest.raises(RequestError, match="more than 7 chunks"):
        asyncio.run(ImageDecoder(limits).decode_all([png_chunk_flood(10)], lambda i: f"#{i}"))


def test_decode_later_checks_now_and_leaves_small_images_to_the_batch() -> None:
    threads: list[int] = []
    decoder = _recording_decoder(threads)

    deferred = asyncio.run(decoder.decode_later([png(28, 28)] * 3, lambda i: f"#{i}"))
    assert deferred.count == 3 and threads == []  # checked, not decoded
    assert deferred.decode().shape == (3, 28, 28) and len(threads) == 3

    with pytest.raises(RequestError) as refused:  # the limits still answer before queueing
        asyncio.run(decoder.decode_later([png(3200, 3200, "I;16")], lambda i: "big"))
    assert refused.value.status_code == 413 and not threads[3:]


def test_decode_later_decodes_now_what_the_loop_would_not_decode_inline() -> None:
    threads: list[int] = []

    async def run() -> int:
        deferred = await _recording_decoder(threads).decode_later(
            [png(28, 28), png(600, 600)], lambda i: f"#{i}"
        )
        assert len(threads) == 2  # already decoded, the big one in a thread
        assert deferred.decode().shape == (2, 28, 28)
        return threading.get_ident()

    loop_thread = asyncio.run(run())
    assert threads[0] == loop_thread and threads[1] != loop_thread and len(threads) == 2


def test_a_deferred_image_that_does_not_decode_is_a_request_error_naming_it() -> None:
    good = png(28, 28)
    broken = good[:-20] + b"\x00" * 20  # a valid header, a damaged end
    deferred = asyncio.run(
        ImageDecoder(LIMITS).decode_later([good, broken], lambda i: f"image_file #{i + 1}")
    )
    with pytest.raises(RequestError) as refused:
        deferred.decode()
    assert refused.value.status_code in (400, 415, 422)
    assert refused.value.detail.startswith("image_file #2")
