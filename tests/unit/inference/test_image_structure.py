"""Chunk, marker and frame floods are refused from the file's structure before Pillow parses
them; images with a normal structure decode as before (issue 17, defect 3)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from digitflow.errors import ImageTooLarge
from digitflow.inference.image_structure import DEFAULT_MAX_SEGMENTS, check_jpeg, count_gif_frames
from digitflow.inference.preprocess import MAX_FRAMES, bytes_to_input, probe_image
from tests.support.image_floods import gif_frame_flood, jpeg_comment_flood, png_chunk_flood


@pytest.fixture
def pillow_must_not_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> Image.Image:
        raise AssertionError("Pillow was asked to parse the flood")

    monkeypatch.setattr(Image, "open", refuse)  # the module preprocess calls it on


@pytest.mark.parametrize(
    ("flood", "message"),
    [
        (lambda: png_chunk_flood(830_000), "PNG file holds more than 10000 chunks"),
        (lambda: jpeg_comment_flood(2_500_000), "more than 10000 markers or junk bytes"),
    ],
)
@pytest.mark.usefixtures("pillow_must_not_parse")
def test_a_chunk_or_marker_flood_is_refused_before_pillow_parses_it(
    flood: object, message: str
) -> None:
    data = flood()  # type: ignore[operator]
    with pytest.raises(ImageTooLarge, match=message):
        probe_image(data)
    with pytest.raises(ImageTooLarge, match=message):
        bytes_to_input(data)


def test_a_gifs_frames_are_counted_only_up_to_one_past_the_limit() -> None:
    flood = gif_frame_flood(664_000)
    assert count_gif_frames(flood, DEFAULT_MAX_SEGMENTS, MAX_FRAMES) == MAX_FRAMES + 1
    assert probe_image(flood).frames == MAX_FRAMES + 1
    with pytest.raises(ImageTooLarge, match=f"more than {MAX_FRAMES} frames"):
        bytes_to_input(flood)
    assert count_gif_frames(gif_frame_flood(5), DEFAULT_MAX_SEGMENTS, MAX_FRAMES) == 6


@pytest.mark.usefixtures("pillow_must_not_parse")
def test_a_gif_of_one_byte_sub_blocks_is_refused_by_its_block_budget() -> None:
    buf = io.BytesIO()
    Image.new("L", (8, 8), 255).save(buf, "GIF")
    data = buf.getvalue()
    comment = b"\x21\xfe" + b"\x01x" * 2_000_000 + b"\x00"  # one comment, 2M sub-blocks
    flood = data[:-1] + comment + b";"
    with pytest.raises(ImageTooLarge, match="GIF file holds more than"):
        probe_image(flood)


def _png_in_chunks(image: Image.Image, piece: int) -> bytes:
    """`image` as a PNG whose image data is split into IDAT chunks of `piece` bytes."""
    buf = io.BytesIO()
    image.save(buf, "PNG")
    data = buf.getvalue()
    pos, idat, head, tail = 8, b"", b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        whole = data[pos : pos + 12 + length]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        elif idat:
            tail += whole
        else:
            head += whole
        pos += 12 + length

    def chunk(payload: bytes) -> bytes:
        crc = zlib.crc32(b"IDAT" + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + b"IDAT" + payload + struct.pack(">I", crc)

    pieces = b"".join(chunk(idat[i : i + piece]) for i in range(0, len(idat), piece))
    return data[:8] + head + pieces + tail


def test_a_png_of_thousands_of_idat_chunks_under_the_limit_decodes_as_before() -> None:
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (300, 300), dtype=np.uint8))
    plain = io.BytesIO()
    image.save(plain, "PNG")
    split = _png_in_chunks(image, 16)
    chunks = split.count(b"IDAT")
    assert 5_000 < chunks < DEFAULT_MAX_SEGMENTS
    np.testing.assert_array_equal(bytes_to_input(split), bytes_to_input(plain.getvalue()))
    with pytest.raises(ImageTooLarge, match="chunks"):
        bytes_to_input(split, max_segments=chunks // 2)


def test_junk_bytes_before_a_jpegs_scan_count_toward_the_limit() -> None:
    buf = io.BytesIO()
    Image.new("L", (28, 28), 255).save(buf, "JPEG")
    data = buf.getvalue()
    check_jpeg(data[:2] + b"\x00" * 100 + data[2:], max_segments=1_000)
    with pytest.raises(ImageTooLarge, match="junk bytes"):
        check_jpeg(data[:2] + b"\x00" * 5_000 + data[2:], max_segments=1_000)
