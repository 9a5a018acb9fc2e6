"""Fuzzing THE transform: random and mutated image bytes, floods of chunks, markers and frames,
and noise images never escape as anything but a refusal, and no input costs more than the
issue's budget (100 ms, 50 MiB; checked at 3×) to decode and preprocess."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from digitflow.errors import ImageTooLarge, InvalidImage
from digitflow.inference.limits import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_WORK_PIXELS
from digitflow.inference.preprocess import bytes_to_input, probe_image
from tests.support.image_floods import (
    dot_grid_png,
    gif_frame_flood,
    jpeg_comment_flood,
    png_chunk_flood,
)

# The limits; checked with slack for a loaded 2-core box (the worst case seen is printed).
TIME_LIMIT_S = 0.100
MEMORY_LIMIT_BYTES = 50 * 1024 * 1024
# A noise image of ≤ 512² costs ~10-20 ms of CPU to decode and search: 10× that at most (before
# the component cap, a 512² dot grid cost ~200 ms and a 256² one 50 ms).
NOISE_CPU_LIMIT_S = 0.150
# The server's default per-image pixel limit (MAX_IMAGE_PIXELS); the decode cost uses its default.
MAX_PIXELS = DEFAULT_MAX_IMAGE_PIXELS


def _encode(fmt: str, mode: str, size: tuple[int, int], frames: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    bands = len(Image.new(mode, (1, 1)).getbands())
    shape = (size[1], size[0], bands) if bands > 1 else (size[1], size[0])
    images = [
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)
        for _ in range(frames)
    ]
    buf = io.BytesIO()
    extra = {"save_all": True, "append_images": images[1:]} if frames > 1 else {}
    if fmt == "JPEG" and mode not in ("L", "RGB"):
        images[0] = images[0].convert("RGB")
    if fmt == "BMP":
        images[0] = images[0].convert("RGB" if bands > 1 else "L")
        extra = {}
    images[0].save(buf, format=fmt, **extra)
    return buf.getvalue()


SEEDS = {
    (fmt, mode, frames): _encode(fmt, mode, (23, 17), frames, 1)
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP")
    for mode in ("L", "RGB", "RGBA")
    for frames in (1, 3)
    if not (fmt in ("JPEG", "BMP") and frames > 1)
}


@st.composite
def image_bytes(draw: st.DrawFn) -> bytes:
    """A valid small image of any allowed format, then mutated: bytes flipped, cut, spliced."""
    base = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[base])
    for _ in range(draw(st.integers(0, 6))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "header"]))
        if action == "flip" and data:
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] = draw(st.integers(0, 255))
        elif action == "cut" and len(data) > 8:
            data = data[: draw(st.integers(8, len(data)))]
        elif action == "insert":
            pos = draw(st.integers(0, len(data)))
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif action == "header" and len(data) > 32:
            # Headers carry width, height and frame counts: make them big.
            pos = draw(st.integers(6, 31))
            data[pos] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF]))
    return bytes(data)


def _peak_rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


WORST = {"seconds": 0.0, "bytes": 0}


def _check_one(data: bytes, cpu_limit_s: float | None = None) -> None:
    """Refused or read within the time and memory budget (and `cpu_limit_s` of this thread's
    CPU when given: unlike wall time, it does not grow with the machine's other load)."""
    can_measure_memory = _peak_rss_reset()
    before = _rss()
    cpu_started = time.thread_time()
    started = time.perf_counter()
    try:
        result = bytes_to_input(data, max_pixels=MAX_PIXELS)
    except InvalidImage:
        result = None
    elapsed = time.perf_counter() - started
    cpu = time.thread_time() - cpu_started
    grown = _peak_rss() - before if can_measure_memory else 0
    WORST["seconds"] = max(WORST["seconds"], elapsed)
    WORST["bytes"] = max(WORST["bytes"], grown)
    if result is not None:
        assert result.shape == (28, 28) and result.dtype == np.float32
        assert np.isfinite(result).all() and result.min() >= 0 and result.max() <= 1
    assert elapsed < TIME_LIMIT_S * 3, f"{elapsed * 1000:.0f} ms for {data[:64]!r}"
    assert grown < MEMORY_LIMIT_BYTES, f"{grown / 2**20:.0f} MiB for {data[:64]!r}"
    if cpu_limit_s is not None:
        assert cpu < cpu_limit_s, f"{cpu * 1000:.0f} ms of CPU for {data[:64]!r}"


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(image_bytes())
def test_mutated_images_are_refused_or_read_within_time_and_memory(data: bytes) -> None:
    _check_one(data)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.binary(min_size=0, max_size=512))
def test_random_bytes_are_refused_as_invalid_images(data: bytes) -> None:
    _check_one(data)


@pytest.mark.parametrize(
    ("fmt", "mode", "side", "frames"),
    [
        ("PNG", "I;16", 3200, 1),  # issue 9: 16-bit, white with two dark pixels, 27 KB
        ("WEBP", "RGB", 4472, 2),  # issue 9: animated WebP declaring a huge canvas
        ("GIF", "L", 2100, 2),
        ("PNG", "RGBA", 2100, 1),
    ],
)
def test_big_declared_images_are_refused_from_the_header_before_decoding(
    fmt: str, mode: str, side: int, frames: int
) -> None:
    if mode == "I;16":
        arr = np.full((side, side), 65535, dtype=np.uint16)
        arr[10, 10] = arr[20, 20] = 0
        image = Image.fromarray(arr)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        images = [Image.new(mode, (side, side), c) for c in ("white", "black")[:frames]]
        buf = io.BytesIO()
        extra = {"save_all": True, "append_images": images[1:]} if frames > 1 else {}
        images[0].save(buf, format=fmt, **extra)
        data = buf.getvalue()
    probe = probe_image(data)
    assert (probe.format, probe.width, probe.height, probe.frames) == (fmt, side, side, frames)
    assert probe.work_pixels > DEFAULT_MAX_WORK_PIXELS
    with pytest.raises(ImageTooLarge, match="decoding it would fill"):
        bytes_to_input(data, max_pixels=MAX_PIXELS)


@st.composite
def structure_floods(draw: st.DrawFn) -> bytes:
    """A few pixels in a flood of PNG chunks, JPEG markers or junk, GIF frames or sub-blocks."""
    kind = draw(st.sampled_from(["png", "jpeg", "junk", "gif", "sub-blocks"]))
    # Sizes spread over orders of magnitude: around the budget and far past it, not just small.
    count = draw(st.sampled_from([0, 100, 5_000, 9_000, 20_000, 100_000, 300_000]))
    count += draw(st.integers(0, 999))
    side = draw(st.integers(1, 64))
    if kind == "png":
        return png_chunk_flood(count, side)
    if kind == "jpeg":
        return jpeg_comment_flood(count, side)
    if kind == "junk":
        data = jpeg_comment_flood(0, side)
        return data[:20] + b"\x00" * count + data[20:]  # after SOI and APP0
    if kind == "gif":
        return gif_frame_flood(count // 10, side)
    data = gif_frame_flood(0, side)
    return data[:-1] + b"\x21\xfe" + b"\x01x" * count + b"\x00;"


@st.composite
def noise_images(draw: st.DrawFn) -> bytes:
    """Dot grids and salt-and-pepper noise: thousands of ink components, no digit."""
    side = draw(st.sampled_from([64, 256, 512])) - draw(st.integers(0, 31))
    step = draw(st.integers(2, 4))
    density = draw(st.sampled_from([0.01, 0.05, 0.2, 0.5]))
    seed = draw(st.integers(0, 2**16))
    gray = np.full((side, side), 255, np.uint8)
    if draw(st.booleans()):
        gray[::step, ::step] = 0
    else:
        rng = np.random.default_rng(seed)
        gray[rng.random((side, side)) < density] = 0
    if draw(st.booleans()):
        gray = 255 - gray  # light dots on dark
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format=draw(st.sampled_from(["PNG", "GIF", "BMP"])))
    return buf.getvalue()


def _sub_block_flood(count: int) -> bytes:
    data = gif_frame_flood(0)
    return data[:-1] + b"\x21\xfe" + b"\x01x" * count + b"\x00;"


def _noise(side: int, density: float) -> bytes:
    gray = np.full((side, side), 255, np.uint8)
    gray[np.random.default_rng(side).random((side, side)) < density] = 0
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    return buf.getvalue()


@settings(max_examples=25, deadline=None, derandomize=True)
@given(structure_floods())
@example(png_chunk_flood(300_000))
@example(jpeg_comment_flood(300_000))
@example(gif_frame_flood(30_000))
@example(_sub_block_flood(300_000))
def test_chunk_marker_and_frame_floods_are_refused_or_read_within_time_and_memory(
    data: bytes,
) -> None:
    _check_one(data)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(noise_images())
@example(dot_grid_png(512, 2))
@example(_noise(512, 0.2))
def test_noise_images_are_read_within_time_and_memory(data: bytes) -> None:
    _check_one(data, cpu_limit_s=NOISE_CPU_LIMIT_S)


def test_the_worst_fuzzed_input_is_reported() -> None:
    print(f"fuzz worst case: {WORST['seconds'] * 1000:.1f} ms, {WORST['bytes'] / 2**20:.1f} MiB")
