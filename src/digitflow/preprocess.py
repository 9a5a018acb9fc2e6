"""THE image transform, shared by training, serving and batch prediction.

Bytes are recognised by their signature (never by a client's name or content type), decoded by
the one Pillow plugin that signature names, refused from the header when they declare too many
pixels, and turned into the model's 28×28 float input in [0, 1]:

* an MNIST-format image (28×28, light digit on a dark background) passes through unchanged,
  exactly as the training PNGs do;
* anything else (a photo or scan of a dark digit on light paper, any size or mode) is normalised
  the MNIST way: invert, crop to the digit, fit into 20×20 keeping the aspect ratio, centre by mass
  in 28×28.
"""

from __future__ import annotations

import io
import warnings
from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFilter

from digitflow.errors import ImageTooLarge, InvalidImage, UnsupportedImageFormat

MNIST_SIZE: Final = 28
MNIST_BOX: Final = 20
DEFAULT_MAX_IMAGE_PIXELS: Final = 4096 * 4096
# A big photo is reduced to about this many pixels a side before it is normalised: the digit ends
# up in a 20×20 box anyway, and full-resolution filtering of a 16-megapixel photo took ~1.2 s.
WORK_SIDE: Final = 512

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

FloatArray = npt.NDArray[np.float32]


def sniff_format(data: bytes) -> str:
    """Name the allow-listed format of `data` from its leading bytes, or raise."""
    if not data:
        raise InvalidImage("the file is empty")
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
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


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode `data` with the one Pillow plugin its signature names; refuse bombs by header."""
    fmt = sniff_format(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = image.size
            if width <= 0 or height <= 0:
                raise InvalidImage(f"the {fmt} header declares an empty image")
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"the image is {width}×{height} = {width * height} pixels; "
                    f"the limit is {max_pixels}"
                )
            if fmt == "JPEG" and max(width, height) > 2 * WORK_SIDE:
                image.draft(None, (WORK_SIDE, WORK_SIDE))  # decode at 1/2–1/8 scale (DCT)
            image.seek(0)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"the image declares too many pixels: {exc}") from None
    except InvalidImage:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        raise InvalidImage(
            f"the {fmt} data is truncated or corrupt ({type(exc).__name__})"
        ) from None
    return image


def to_grayscale(image: Image.Image) -> FloatArray:
    """Any mode → H×W float32 in [0, 1]; transparency is laid over white, 16-bit is scaled down."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(image, dtype=np.float32)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        return np.asarray(np.clip(arr / top, 0.0, 1.0), dtype=np.float32)
    if mode == "F":
        arr = np.asarray(image, dtype=np.float32)
        top = 255.0 if arr.max(initial=0) > 1.0 else 1.0
        return np.asarray(np.clip(arr / top, 0.0, 1.0), dtype=np.float32)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image, dtype=np.float32) / np.float32(255.0)


def _border_mean(arr: FloatArray) -> float:
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    return float(border.mean())


def is_mnist_format(arr: FloatArray) -> bool:
    """28×28 with a dark background: the training data's own form."""
    return arr.shape == (MNIST_SIZE, MNIST_SIZE) and _border_mean(arr) < 0.5


def normalise_like_mnist(arr: FloatArray) -> FloatArray:
    """A digit of any size and polarity → MNIST's 28×28 layout (20×20 box, centred by mass)."""
    if _border_mean(arr) >= 0.5:
        arr = 1.0 - arr
    background = float(np.median(np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])))
    arr = np.clip(arr - background, 0.0, None)
    peak = float(arr.max())
    if peak <= 0.05:
        return np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.float32)
    arr = arr / peak
    arr[arr < 0.2] = 0.0
    rows = np.flatnonzero(arr.max(axis=1) > 0)
    cols = np.flatnonzero(arr.max(axis=0) > 0)
    digit = arr[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    height, width = digit.shape
    scale = MNIST_BOX / max(height, width)
    image = Image.fromarray((digit * 255.0).astype(np.uint8), mode="L")
    # MNIST strokes are ~2-3 px wide after scaling; thicken thin pen strokes before shrinking.
    stroke_px = round(1.0 / scale)
    if stroke_px >= 3:
        image = image.filter(ImageFilter.MaxFilter(min(stroke_px | 1, 15)))
    new_w = max(1, round(width * scale))
    new_h = max(1, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    small = np.asarray(image, dtype=np.float32) / np.float32(255.0)

    canvas = np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.float32)
    total = float(small.sum())
    ys, xs = np.indices(small.shape)
    cy = float((ys * small).sum() / total) if total > 0 else new_h / 2
    cx = float((xs * small).sum() / total) if total > 0 else new_w / 2
    top = round(MNIST_SIZE / 2 - cy)
    left = round(MNIST_SIZE / 2 - cx)
    top = min(max(top, 0), MNIST_SIZE - new_h)
    left = min(max(left, 0), MNIST_SIZE - new_w)
    canvas[top : top + new_h, left : left + new_w] = small
    return np.clip(canvas, 0.0, 1.0)


def shrink_for_work(image: Image.Image) -> Image.Image:
    """A big image box-reduced by an integer factor to about `WORK_SIDE` a side; others as is."""
    side = max(image.size)
    if side <= 2 * WORK_SIDE:
        return image
    if image.mode in ("1", "P", "PA"):
        image = image.convert("RGBA")  # keeps a palette's transparency as alpha
    try:
        return image.reduce(-(-side // WORK_SIDE))
    except ValueError:  # a mode reduce() does not support (e.g. 16-bit): keep full size
        return image


def image_to_input(image: Image.Image) -> FloatArray:
    """A decoded image → the model's 28×28 float32 input in [0, 1]."""
    arr = to_grayscale(shrink_for_work(image))
    if is_mnist_format(arr):
        return arr
    return normalise_like_mnist(arr)


def bytes_to_input(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> FloatArray:
    """Bytes of an allow-listed image → the model's 28×28 float32 input; raises InvalidImage."""
    return image_to_input(decode_image(data, max_pixels=max_pixels))
