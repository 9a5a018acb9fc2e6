"""THE image transform, shared by training, serving and batch prediction.

Bytes are recognised by their signature (never by a client's name or content type), probed from
the header by the one Pillow plugin that signature names, refused there when they declare too many
pixels or frames, decoded (first frame only; a big JPEG at reduced DCT scale; EXIF orientation
honoured), and turned into the model's 28×28 float input in [0, 1]:

* an MNIST-format image (28×28, light digit on a dark background) passes through unchanged,
  exactly as the training PNGs do (a plain 28×28 8-bit grayscale PNG, the training data's own
  file form, is decoded by OpenCV's libpng in a quarter of Pillow's time: `mnist_png_input`);
* anything else (a phone photo, a scan, a canvas drawing; any size, mode or bit depth) is reduced
  to grayscale of at most `WORK_SIDE` px a side and handed to `digit_locator`, which finds the
  digit and lays it out the MNIST way.
"""

from __future__ import annotations

import io
import warnings
import zlib
from dataclasses import dataclass
from typing import Final

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

from digitflow.errors import ImageTooLarge, InvalidImage, UnsupportedImageFormat
from digitflow.inference.digit_locator import locate_digit
from digitflow.inference.image_structure import (
    DEFAULT_MAX_SEGMENTS,
    check_jpeg,
    check_png,
    count_gif_frames,
    png_chunks,
)
from digitflow.inference.limits import (
    DEFAULT_MAX_COMPONENTS,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_WORK_PIXELS,
)

MNIST_SIZE: Final = 28
# Only the first frame is decoded; a file declaring more frames than this is refused (a GIF's
# are counted up to one past it, not to the end).
MAX_FRAMES: Final = 100
# Images are reduced to at most this many pixels a side before the digit is searched for.
WORK_SIDE: Final = 512
# JPEGs larger than twice that are decoded at 1/2–1/8 scale (DCT scaling: cheap, no full decode).
_DRAFT_ABOVE: Final = 2 * WORK_SIDE

ALLOWED_FORMATS: Final = ("PNG", "JPEG", "WEBP", "BMP", "GIF")

_KNOWN_REFUSED: Final = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"8BPS", "PSD"),
    (b"%PDF", "PDF"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"<svg", "SVG"),
    (b"<?xml", "SVG/XML"),
)
PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
# IHDR of the training data's PNGs: 28×28, 8-bit, grayscale, deflate, adaptive filters, no
# interlace.
_MNIST_IHDR: Final = (
    (13).to_bytes(4, "big") + b"IHDR" + bytes([0, 0, 0, 28, 0, 0, 0, 28, 8, 0, 0, 0, 0])
)
_PLAIN_PNG_CHUNKS: Final = frozenset({b"IHDR", b"IDAT", b"IEND"})
_MAX_PLAIN_PNG_CHUNKS: Final = 8
_DECODE_ERRORS: Final = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError)
_SIXTEEN_BIT: Final = ("I;16", "I;16L", "I;16B", "I;16N")

FloatArray = npt.NDArray[np.float32]
UInt8Array = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class ImageProbe:
    """What an image's header declares, read without decoding any pixel data.

    `work_pixels` is the decode cost in pixels: the size the decoder will actually fill (a big
    JPEG is decoded at reduced DCT scale), times 3 for WebP (libwebp's animation decoder keeps two
    canvases beside the image). Decide inline vs. worker thread, and budget memory, by it.
    """

    format: str
    width: int
    height: int
    frames: int
    mode: str
    work_pixels: int

    @property
    def pixels(self) -> int:
        """Declared width × height (what `max_pixels` limits)."""
        return self.width * self.height


def sniff_format(data: bytes) -> str:
    """Name the allow-listed format of `data` from its leading bytes, or raise."""
    if not data:
        raise InvalidImage("the file is empty")
    if data.startswith(PNG_SIGNATURE):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"BM") and len(data) >= 26:
        return "BMP"
    for signature, name in _KNOWN_REFUSED:
        if data.startswith(signature):
            raise UnsupportedImageFormat(
                f"{name} images are not accepted; send PNG, JPEG, WebP, BMP or GIF"
            )
    raise UnsupportedImageFormat("not a supported image; send PNG, JPEG, WebP, BMP or GIF")


def _walk_structure(data: bytes, fmt: str, max_segments: int) -> int | None:
    """Refuse chunk, marker and frame floods before Pillow parses them (`image_structure`);
    a GIF's frame count (Pillow would count them all), else None."""
    if fmt == "PNG":
        check_png(data, max_segments)
    elif fmt == "JPEG":
        check_jpeg(data, max_segments)
    elif fmt == "GIF":
        return count_gif_frames(data, max_segments, MAX_FRAMES)
    return None


def _open(data: bytes, fmt: str, max_segments: int) -> tuple[Image.Image, ImageProbe]:
    """Open `data` lazily (header only), set a JPEG's decoder to luminance (a big one at reduced
    DCT scale), and probe it. Callers turn Pillow's exceptions into ours (`_refusal`)."""
    gif_frames = _walk_structure(data, fmt, max_segments)
    image = Image.open(io.BytesIO(data), formats=[fmt])
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"the {fmt} header declares an empty image")
    frames = gif_frames or int(getattr(image, "n_frames", 1))
    if fmt == "JPEG":
        big = max(width, height) > _DRAFT_ABOVE
        image.draft("L", (WORK_SIDE, WORK_SIDE) if big else None)
    work_w, work_h = image.size
    work = work_w * work_h * (3 if fmt == "WEBP" else 1)
    return image, ImageProbe(fmt, width, height, frames, image.mode, work)


def _refusal(fmt: str, exc: BaseException) -> InvalidImage:
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageTooLarge(f"the image declares too many pixels: {exc}")
    return InvalidImage(f"the {fmt} data is truncated or corrupt ({type(exc).__name__})")


_BOMB: Final = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def probe_image(data: bytes, max_segments: int = DEFAULT_MAX_SEGMENTS) -> ImageProbe:
    """Format, size, frame count and decode cost of `data`, from its header; raises InvalidImage.

    Its cost grows with the file's structure, up to `max_segments` chunks or markers: probe a
    large file off the event loop."""
    fmt = sniff_format(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image, probe = _open(data, fmt, max_segments)
            image.close()
    except (*_BOMB, *_DECODE_ERRORS) as exc:
        raise _refusal(fmt, exc) from None
    return probe


def check_limits(probe: ImageProbe, max_pixels: int, max_work_pixels: int) -> None:
    """Raise ImageTooLarge when `probe` declares more than the limits allow."""
    if probe.pixels > max_pixels:
        raise ImageTooLarge(
            f"the image is {probe.width}×{probe.height} = {probe.pixels} pixels; "
            f"the limit is {max_pixels}"
        )
    if probe.work_pixels > max_work_pixels:
        raise ImageTooLarge(
            f"the {probe.format} image is {probe.width}×{probe.height}: decoding it would fill "
            f"{probe.work_pixels} pixels; the limit is {max_work_pixels} (send a smaller image "
            "or a JPEG)"
        )
    if probe.frames > MAX_FRAMES:
        raise ImageTooLarge(
            f"the image has more than {MAX_FRAMES} frames; the limit is {MAX_FRAMES}"
        )


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_work_pixels: int = DEFAULT_MAX_WORK_PIXELS,
    max_segments: int = DEFAULT_MAX_SEGMENTS,
) -> Image.Image:
    """Decode the first frame of `data`, upright; refuse bombs from the header, before decoding."""
    fmt = sniff_format(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image, probe = _open(data, fmt, max_segments)
            check_limits(probe, max_pixels, max_work_pixels)
            if probe.frames > 1:
                image.seek(0)
            image.load()
            if "exif" in image.info and image.getexif().get(0x0112, 1) != 1:
                image = ImageOps.exif_transpose(image)
    except (*_BOMB, *_DECODE_ERRORS) as exc:
        raise _refusal(fmt, exc) from None
    return image


def to_gray_u8(image: Image.Image) -> UInt8Array:
    """Any mode → H×W uint8 luminance; transparency laid over white; 16/32-bit scaled to 8-bit."""
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        wide = np.asarray(image)
        if mode == "I" and int(wide.max(initial=0)) <= 255:
            return np.asarray(np.clip(wide, 0, 255), dtype=np.uint8)
        return np.asarray(np.clip(wide, 0, 65535) >> 8, dtype=np.uint8)
    if mode == "F":
        real = np.nan_to_num(np.asarray(image, dtype=np.float32))
        top = 255.0 if float(real.max(initial=0)) > 1.0 else 1.0
        return np.asarray(np.clip(real * (255.0 / top), 0, 255), dtype=np.uint8)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image, dtype=np.uint8)


# The border's 112 pixels (corners counted twice) summed, below half of white on average: the
# training data's dark background. Integer sums over the raw bytes: no array is made for it.
_DARK_BORDER_LIMIT = 4 * MNIST_SIZE * 255 / 2


def has_dark_border(pixels: bytes) -> bool:
    """True when 28×28 8-bit row-major `pixels` have the training data's dark border."""
    side = MNIST_SIZE
    total = sum(pixels[:side]) + sum(pixels[-side:]) + sum(pixels[::side])
    return total + sum(pixels[side - 1 :: side]) < _DARK_BORDER_LIMIT


def _mnist_input(pixels: bytes) -> FloatArray:
    """28×28 8-bit pixels → float32 in [0, 1], exactly as training reads them."""
    arr = np.frombuffer(pixels, dtype=np.uint8).reshape(MNIST_SIZE, MNIST_SIZE)
    return arr.astype(np.float32) / np.float32(255.0)


def _is_plain_mnist_png(data: bytes) -> bool:
    """A well-formed 28×28 8-bit grayscale PNG made of IHDR, IDAT and IEND chunks only (at most
    `_MAX_PLAIN_PNG_CHUNKS`), ending at IEND: no transparency, gamma, palette, orientation or
    trailing data that Pillow's path would treat differently. Every chunk's CRC, the deflate
    stream, its length and the row filters are checked here, so libpng never meets a fault
    (it would print one line on stderr per faulty upload)."""
    if data[8:29] != _MNIST_IHDR or not data.startswith(PNG_SIGNATURE):
        return False
    idat = []
    for count, (kind, start, body_end) in enumerate(png_chunks(data), start=1):
        if count > _MAX_PLAIN_PNG_CHUNKS or kind not in _PLAIN_PNG_CHUNKS:
            return False
        crc = data[body_end : body_end + 4]
        if len(crc) < 4 or zlib.crc32(data[start - 4 : body_end]) != int.from_bytes(crc, "big"):
            return False
        if kind == b"IDAT":
            idat.append(data[start:body_end])
        elif kind == b"IEND":
            return body_end + 4 == len(data) and _plain_rows(b"".join(idat))
    return False


_ROW_BYTES: Final = MNIST_SIZE + 1  # a filter byte, then 28 pixels


def _plain_rows(stream: bytes) -> bool:
    """The IDAT stream inflates, completely, to 28 rows with valid filter types (0–4)."""
    inflater = zlib.decompressobj()
    try:
        rows = inflater.decompress(stream, _ROW_BYTES * MNIST_SIZE + 1)
    except zlib.error:
        return False
    if len(rows) != _ROW_BYTES * MNIST_SIZE or not inflater.eof or inflater.unconsumed_tail:
        return False
    return max(rows[::_ROW_BYTES]) <= 4


def mnist_png_input(data: bytes) -> FloatArray | None:
    """The model input of a plain MNIST-layout PNG (`_is_plain_mnist_png`, with the dark
    border), decoded by libpng through OpenCV; None for anything else, which then takes the
    general path (and its errors). PNG is lossless: the pixels are Pillow's, bit for bit."""
    if not _is_plain_mnist_png(data):
        return None
    gray = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if gray is None or gray.shape != (MNIST_SIZE, MNIST_SIZE) or gray.dtype != np.uint8:
        return None  # corrupt (e.g. a bad CRC): Pillow's path names the problem
    pixels = gray.tobytes()
    return _mnist_input(pixels) if has_dark_border(pixels) else None


def shrink_for_work(gray: UInt8Array) -> UInt8Array:
    """Reduce (area-average) to at most `WORK_SIDE` px a side; smaller images as they are."""
    height, width = gray.shape
    side = max(height, width)
    if side <= WORK_SIDE:
        return gray
    scale = WORK_SIDE / side
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(cv2.resize(gray, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)


def image_to_input(image: Image.Image, max_components: int = DEFAULT_MAX_COMPONENTS) -> FloatArray:
    """A decoded image → the model's 28×28 float32 input in [0, 1]."""
    if image.size == (MNIST_SIZE, MNIST_SIZE) and image.mode == "L":
        # tobytes: cheaper than NumPy's array-interface path for a tiny image.
        pixels = image.tobytes()
        if has_dark_border(pixels):
            return _mnist_input(pixels)  # the training data's own form
    gray = to_gray_u8(image)
    if gray.shape == (MNIST_SIZE, MNIST_SIZE):
        pixels = np.ascontiguousarray(gray).tobytes()
        if has_dark_border(pixels):
            return _mnist_input(pixels)
    return locate_digit(shrink_for_work(gray), max_components)


def bytes_to_input(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_work_pixels: int = DEFAULT_MAX_WORK_PIXELS,
    max_segments: int = DEFAULT_MAX_SEGMENTS,
    max_components: int = DEFAULT_MAX_COMPONENTS,
) -> FloatArray:
    """Bytes of an allow-listed image → the model's 28×28 float32 input; raises InvalidImage.

    `max_segments` bounds the file's structure (`image_structure`), `max_components` the digit
    locator's work (past it the image reads as one without a digit)."""
    plain = mnist_png_input(data)
    if plain is not None:
        return plain
    return image_to_input(
        decode_image(data, max_pixels, max_work_pixels, max_segments), max_components
    )
