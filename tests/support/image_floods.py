"""Small files whose structure costs a parser much more than their pixels (issue 17, defects 3-4).

Each is a valid image: a few pixels plus a flood of chunks, markers or frames, or a dot grid that
gives the digit locator one connected component per dot.
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image, ImageDraw


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_chunk_flood(chunks: int, side: int = 28) -> bytes:
    """A `side`² grayscale PNG with `chunks` empty ancillary chunks before its image data."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\x00" + b"\x00" * side for _ in range(side)))
    filler = _png_chunk(b"zzZz", b"") * chunks
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + filler
        + _png_chunk(b"IDAT", pixels)
        + _png_chunk(b"IEND", b"")
    )


def jpeg_comment_flood(markers: int, side: int = 28) -> bytes:
    """A `side`² JPEG with `markers` empty comment (COM) segments after its SOI marker."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 255).save(buf, "JPEG")
    data = buf.getvalue()
    return data[:2] + b"\xff\xfe\x00\x02" * markers + data[2:]


def gif_frame_flood(frames: int, side: int = 16) -> bytes:
    """A `side`² GIF with `frames` 1×1 frames (each a dozen bytes) after its first frame."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 255).save(buf, "GIF")
    data = buf.getvalue()
    assert data.endswith(b";")
    # Image descriptor at 0,0 of 1×1, no local colour table; LZW min code 2; one data sub-block.
    frame = b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00" + b"\x02\x02\x4c\x01\x00"
    return data[:-1] + frame * frames + b";"


def dot_grid_png(side: int, step: int = 4) -> bytes:
    """A white `side`² PNG with one black pixel every `step` px: thousands of tiny components."""
    image = Image.new("L", (side, side), 255)
    draw = ImageDraw.Draw(image)
    for y in range(step // 2, side, step):
        for x in range(step // 2, side, step):
            draw.point((x, y), fill=0)
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def blank_png(side: int = 256) -> bytes:
    """A white `side`² PNG: an image without a digit."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 255).save(buf, "PNG")
    return buf.getvalue()
