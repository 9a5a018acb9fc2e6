"""Walk an image file's container (PNG chunks, JPEG markers, GIF blocks) before Pillow parses it.

Pillow parses these structures in Python, one chunk, marker or junk byte at a time, and counts a
GIF's frames to its end: a 10 MiB file of a few pixels and 800K empty chunks took seconds. This
walk visits the same structures with cheap slicing, stops at a budget of segments (and at
`max_frames` + 1 frames), and refuses the file before Pillow sees it. A normal image holds a few
dozen segments, so the walk costs microseconds.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final

from digitflow.errors import ImageTooLarge

# Default most PNG chunks, JPEG markers before the image data or GIF blocks one image may hold.
DEFAULT_MAX_SEGMENTS: Final = 10_000
# GIF image data comes in sub-blocks of at most 255 bytes: a file may hold one per this many
# bytes beyond the budget (encoders write full 255-byte ones; two bytes each is a flood).
_GIF_BYTES_PER_SUB_BLOCK: Final = 128
_JPEG_STANDALONE: Final = frozenset([0x01, *range(0xD0, 0xD9)])
_PNG_CHUNK: Final = struct.Struct(">I4s")


def _too_many(fmt: str, what: str, limit: int) -> ImageTooLarge:
    return ImageTooLarge(f"the {fmt} file holds more than {limit} {what}; the limit is {limit}")


def png_chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """Each chunk's type and the start and end of its data (its CRC follows), from after the
    signature through IEND, while a chunk header fits in `data`; the end is as declared, not
    checked against the file's."""
    pos, end = 8, len(data)
    while pos + 8 <= end:
        length, kind = _PNG_CHUNK.unpack_from(data, pos)
        yield kind, pos + 8, pos + 8 + length
        if kind == b"IEND":
            return
        pos += 12 + length


def check_png(data: bytes, max_segments: int) -> None:
    """Refuse a PNG with more than `max_segments` chunks (IDAT included) up to IEND."""
    for count, _ in enumerate(png_chunks(data), start=1):
        if count > max_segments:
            raise _too_many("PNG", "chunks", max_segments)


def check_jpeg(data: bytes, max_segments: int) -> None:
    """Refuse a JPEG with more than `max_segments` markers, fill or junk bytes before its scan.

    Mirrors Pillow's header loop, which reads each junk byte and marker on its own (a skipped run
    of junk counts byte by byte, as it costs Pillow), and stops where Pillow does: at SOS or EOI.
    """
    pos, steps, end = 2, 0, len(data)
    while pos + 1 < end:
        if data[pos] != 0xFF:
            found = data.find(b"\xff", pos)
            next_ff = end if found < 0 else found
            steps += next_ff - pos
            pos = next_ff
        else:
            marker = data[pos + 1]
            steps += 1
            if marker == 0xDA or marker == 0xD9:
                return
            if marker == 0xFF:
                pos += 1
            elif marker == 0x00 or marker in _JPEG_STANDALONE:
                pos += 2
            elif pos + 4 <= end:
                pos += 2 + ((data[pos + 2] << 8) | data[pos + 3])
            else:
                return
        if steps > max_segments:
            raise _too_many("JPEG", "markers or junk bytes before its image data", max_segments)


def count_gif_frames(data: bytes, max_segments: int, max_frames: int) -> int:
    """Frames of a GIF, counted up to `max_frames` + 1 (no further), within a block budget."""
    end = len(data)
    if end < 13:
        return 1
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    budget = max_segments + end // _GIF_BYTES_PER_SUB_BLOCK
    frames = steps = 0
    while pos < end:
        introducer = data[pos]
        if introducer == 0x21:  # extension: label, then sub-blocks
            pos += 2
        elif introducer == 0x2C:  # image: descriptor, colour table, LZW code size, sub-blocks
            frames += 1
            if frames > max_frames:
                return frames  # the caller refuses it; the rest need not be counted
            if pos + 10 > end:
                break
            local = data[pos + 9]
            pos += 11 + (3 << ((local & 7) + 1) if local & 0x80 else 0)
        else:  # trailer, or anything Pillow would stop at too
            break
        while pos < end:
            size = data[pos]
            pos += 1 + size
            steps += 1
            if steps > budget:
                raise _too_many("GIF", "blocks", budget)
            if size == 0:
                break
    return max(frames, 1)
