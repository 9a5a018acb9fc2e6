"""The fast path for plain MNIST-layout PNGs gives Pillow's path's input, bit for bit, and takes
nothing else: other PNGs, odd chunks and faults all go the general way, silently."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image, PngImagePlugin

from digitflow.data.mnist import read_annotations
from digitflow.errors import InvalidImage
from digitflow.inference.preprocess import (
    bytes_to_input,
    decode_image,
    image_to_input,
    mnist_png_input,
)


def _general(data: bytes) -> np.ndarray:
    return image_to_input(decode_image(data))


def _pil_png(pixels: np.ndarray, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", **options)
    return buffer.getvalue()


def _digit(seed: int) -> np.ndarray:
    """A light blob on a dark background, like an MNIST digit."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((28, 28), dtype=np.uint8)
    pixels[6:22, 8:20] = rng.integers(0, 256, (16, 12), dtype=np.uint8)
    return pixels


def test_every_held_out_png_takes_the_fast_path_with_the_general_path_s_input(
    data_dir: Path,
) -> None:
    for relative, _ in read_annotations(data_dir, "test"):
        data = (data_dir / relative).read_bytes()
        fast = mnist_png_input(data)
        assert fast is not None, relative
        assert np.array_equal(fast, _general(data)), relative


@settings(max_examples=150, deadline=None)
@given(
    pixels=arrays(np.uint8, (28, 28)),
    dark_border=st.booleans(),
    encoder=st.sampled_from(["pil", "pil-optimize", "pil-level0", "cv2"]),
)
def test_random_gray_pngs_give_the_general_path_s_input(
    pixels: np.ndarray, dark_border: bool, encoder: str
) -> None:
    if dark_border:
        pixels = pixels.copy()
        pixels[[0, -1], :] = 0
        pixels[:, [0, -1]] = 0
    if encoder == "cv2":
        ok, encoded = cv2.imencode(".png", pixels)
        assert ok
        data = encoded.tobytes()
    else:
        options = {
            "pil": {},
            "pil-optimize": {"optimize": True},
            "pil-level0": {"compress_level": 0},
        }
        data = _pil_png(pixels, **options[encoder])
    fast = mnist_png_input(data)
    general = _general(data)
    if fast is not None:
        assert np.array_equal(fast, general)
    assert np.array_equal(bytes_to_input(data), general)


def _with_chunk(data: bytes, kind: bytes, body: bytes) -> bytes:
    """`data` with a chunk inserted right after IHDR."""
    chunk = struct.pack(">I", len(body)) + kind + body
    chunk += struct.pack(">I", zlib.crc32(kind + body))
    return data[:33] + chunk + data[33:]


@pytest.mark.parametrize(
    "variant",
    ["tRNS", "gAMA", "tEXt", "trailing", "interlaced", "rgb", "16-bit", "light-border"],
)
def test_other_pngs_take_the_general_path(variant: str) -> None:
    pixels = _digit(1)
    plain = _pil_png(pixels)
    assert mnist_png_input(plain) is not None  # the variants below differ from this one only
    data = {
        "tRNS": lambda: _with_chunk(plain, b"tRNS", b"\x00\x00"),
        "gAMA": lambda: _with_chunk(plain, b"gAMA", struct.pack(">I", 45455)),
        "tEXt": lambda: _pil_png(pixels, pnginfo=_text_info()),
        "trailing": lambda: plain + b"\x00" * 16,
        "interlaced": lambda: _interlaced(plain),
        "rgb": lambda: _pil_png(np.stack([pixels] * 3, axis=-1)),
        "16-bit": lambda: _pil_png(pixels.astype(np.uint16) * 257),
        "light-border": lambda: _pil_png(255 - pixels),
    }[variant]()
    assert mnist_png_input(data) is None
    _assert_same_outcome(data)


def _assert_same_outcome(data: bytes) -> None:
    """`bytes_to_input` answers as the general path does: the same input, or InvalidImage."""
    try:
        general: np.ndarray | None = _general(data)
    except InvalidImage:
        general = None
    if general is None:
        with pytest.raises(InvalidImage):
            bytes_to_input(data)
    else:
        assert np.array_equal(bytes_to_input(data), general)


def _text_info() -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "hello")
    return info


def _interlaced(plain: bytes) -> bytes:
    """The IHDR's interlace flag set (CRC fixed): the rows no longer fit, Pillow refuses it."""
    ihdr = bytearray(plain[12:29])
    ihdr[-1] = 1
    return plain[:12] + bytes(ihdr) + struct.pack(">I", zlib.crc32(bytes(ihdr))) + plain[33:]


@pytest.mark.parametrize("position", [20, 35, 40, -20, -10, -5])
def test_a_corrupt_png_is_left_to_the_general_path_and_libpng_prints_nothing(
    position: int, capfd: pytest.CaptureFixture[str]
) -> None:
    damaged = bytearray(_pil_png(_digit(2)))
    damaged[position] ^= 0xFF
    assert mnist_png_input(bytes(damaged)) is None
    _assert_same_outcome(bytes(damaged))
    assert "libpng" not in capfd.readouterr().err
