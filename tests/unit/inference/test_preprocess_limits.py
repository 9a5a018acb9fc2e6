"""Header probe, decode-cost and frame caps, 16-bit and animated images, EXIF orientation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from digitflow.errors import ImageTooLarge, InvalidImage
from digitflow.inference.limits import DEFAULT_MAX_WORK_PIXELS
from digitflow.inference.preprocess import (
    MAX_FRAMES,
    ImageProbe,
    bytes_to_input,
    probe_image,
)


def _digit_one(size: tuple[int, int], mode: str = "L") -> Image.Image:
    """A dark vertical bar (a '1') on white, as `mode`."""
    image = Image.new("L", size, 255)
    w, h = size
    ImageDraw.Draw(image).rectangle([w * 0.45, h * 0.2, w * 0.55, h * 0.8], fill=0)
    return image.convert(mode)


def _save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def test_probe_reads_format_size_frames_and_decode_cost_from_the_header() -> None:
    jpeg = _save(_digit_one((4000, 3000), "RGB"), "JPEG", quality=80)
    probe = probe_image(jpeg)
    assert isinstance(probe, ImageProbe)
    assert (probe.format, probe.width, probe.height, probe.frames) == ("JPEG", 4000, 3000, 1)
    assert probe.pixels == 12_000_000
    # Decoded at 1/4 DCT scale: the cost is the reduced size, so a 12-MP photo is accepted.
    assert probe.work_pixels == 1000 * 750
    assert bytes_to_input(jpeg).max() > 0.5


def test_probe_refuses_what_is_not_an_image() -> None:
    with pytest.raises(InvalidImage):
        probe_image(b"not an image at all")


def test_a_16_bit_png_is_scaled_to_8_bits_reduced_and_read() -> None:
    arr = (np.asarray(_digit_one((1500, 1500)), dtype=np.uint16) * 257).astype(np.uint16)
    data = _save(Image.fromarray(arr), "PNG")
    assert probe_image(data).mode.startswith("I")
    result = bytes_to_input(data)
    assert result.shape == (28, 28)
    assert result[4:24, 12:16].mean() > 0.5  # the bar, centred, light on dark
    assert result[:, :6].max() == 0.0


def test_a_png_whose_decode_would_exceed_the_work_cap_is_refused_by_size() -> None:
    side = int(DEFAULT_MAX_WORK_PIXELS**0.5) + 1
    data = _save(Image.new("L", (side, side), 255), "PNG")
    with pytest.raises(ImageTooLarge, match="decoding it would fill"):
        bytes_to_input(data)
    assert bytes_to_input(data, max_work_pixels=side * side).shape == (28, 28)


def test_the_declared_pixel_limit_keeps_its_meaning() -> None:
    data = _save(_digit_one((300, 300)), "PNG")
    with pytest.raises(ImageTooLarge, match="the limit is 50000"):
        bytes_to_input(data, max_pixels=50_000)


def test_an_animated_gif_is_read_from_its_first_frame_only() -> None:
    first = _digit_one((120, 120)).convert("P")
    second = Image.new("L", (120, 120), 0).convert("P")
    data = _save(first, "GIF", save_all=True, append_images=[second])
    assert probe_image(data).frames == 2
    only_first = bytes_to_input(_save(first, "GIF"))
    np.testing.assert_array_equal(bytes_to_input(data), only_first)


def test_an_image_with_too_many_frames_is_refused() -> None:
    frames = [Image.new("L", (4, 4), 255 * (i % 2)) for i in range(MAX_FRAMES + 1)]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], disposal=2)
    assert probe_image(data).frames == MAX_FRAMES + 1
    with pytest.raises(ImageTooLarge, match="frames"):
        bytes_to_input(data)


def test_exif_orientation_is_honoured() -> None:
    upright = _digit_one((400, 300), "RGB")
    # Stored lying on its side, with the EXIF tag that says "rotate 90° clockwise to view".
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = _save(stored, "JPEG", quality=90, exif=exif.tobytes())
    untagged = _save(stored, "JPEG", quality=90)
    bar = bytes_to_input(tagged)
    lying = bytes_to_input(untagged)
    # Upright, the '1' is a vertical bar: much taller than wide. Ignoring the tag, horizontal.
    assert bar[:, 13:15].sum() > bar[13:15, :].sum()
    assert lying[13:15, :].sum() > lying[:, 13:15].sum()
