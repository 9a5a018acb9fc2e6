"""Photo-like and canvas-like renderings of MNIST digits, deterministic for a given generator.

Used twice, on disjoint data: training renders the *training* split (domain randomisation, so the
model meets photos before users send them) and `benchmarks/photos.py` renders the *held-out* split
to measure. A photo is a digit written on paper and photographed: paper tone, uneven light and a
shadow, grain, optional ruled or squared lines, black or blue ink, rotation up to 12°, slight
perspective, optional table around the sheet, defocus blur, JPEG.
"""

from __future__ import annotations

import io
import math
from typing import Final

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image

CONDITIONS: Final = ("paper", "table", "ruled", "blue", "blur", "small")

UInt8Array = npt.NDArray[np.uint8]
FloatArray = npt.NDArray[np.float32]


def _pen_strokes(digit: UInt8Array, height: int, level: float = 0.3) -> FloatArray:
    """A 28×28 MNIST digit (light on dark) → ink coverage in [0, 1], `height` px tall, crisp edges;
    a higher `level` draws thinner strokes (MNIST's are marker-thick, a pen's are thinner)."""
    size = max(4, height)
    big = cv2.resize(digit, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255
    return np.clip((big - level) * 4.0, 0.0, 1.0)


def _noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> FloatArray:
    """Gaussian noise, float32 (the float64 default is several times slower at photo sizes)."""
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)


def _illumination(h: int, w: int, rng: np.random.Generator) -> FloatArray:
    """A smooth light field: a gradient, a vignette and sometimes a soft shadow, around 1."""
    ys = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    xs = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    angle = rng.uniform(0, 2 * math.pi)
    light = 1.0 + rng.uniform(0.05, 0.3) * (
        (xs - 0.5) * math.cos(angle) + (ys - 0.5) * math.sin(angle)
    )
    light -= rng.uniform(0.0, 0.25) * ((xs - 0.5) ** 2 + (ys - 0.5) ** 2)
    if rng.random() < 0.5:
        a = rng.uniform(0, 2 * math.pi)
        edge = (xs - rng.uniform(0.2, 0.8)) * math.cos(a) + (ys - rng.uniform(0.2, 0.8)) * math.sin(
            a
        )
        light *= 1.0 - rng.uniform(0.15, 0.4) / (1.0 + np.exp(-edge * rng.uniform(15, 60)))
    return np.asarray(light, dtype=np.float32)


def _rule_lines(
    h: int, w: int, spacing: float, squared: bool, rng: np.random.Generator
) -> FloatArray:
    """Coverage of a notebook's printed lines (horizontal, or a square grid)."""
    lines = np.zeros((h, w), dtype=np.float32)
    thickness = int(rng.integers(1, 3))
    offset = rng.uniform(0, spacing)
    y = offset
    while y < h:
        cv2.line(lines, (0, int(y)), (w - 1, int(y)), 1.0, thickness)
        y += spacing
    if squared:
        x = rng.uniform(0, spacing)
        while x < w:
            cv2.line(lines, (int(x), 0), (int(x), h - 1), 1.0, thickness)
            x += spacing
    return lines


def render_photo(
    digit: UInt8Array, condition: str, rng: np.random.Generator, frame: tuple[int, int] = (480, 640)
) -> bytes:
    """A JPEG photo (width, height = `frame`) of `digit` written on paper under `condition`."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; expected one of {CONDITIONS}")
    fw, fh = frame
    if condition == "small":
        fw, fh = fw * 5 // 2, fh * 5 // 2
    on_table = condition == "table" or (condition != "paper" and rng.random() < 0.3)
    # The sheet is drawn flat, then warped into the frame (rotation + slight perspective).
    sw, sh = (int(fw * 0.75), int(fh * 0.75)) if on_table else (int(fw * 1.4), int(fh * 1.4))
    short = min(fw, fh)
    digit_h = int(
        short * (rng.uniform(0.05, 0.09) if condition == "small" else rng.uniform(0.25, 0.6))
    )
    ink = np.zeros((sh, sw), dtype=np.float32)
    strokes = _pen_strokes(digit, digit_h, rng.uniform(0.3, 0.75))
    thinning = round(digit_h * rng.uniform(0.0, 0.03))
    if thinning >= 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (thinning + 1, thinning + 1))
        thinned = np.asarray(cv2.erode(strokes, kernel), dtype=np.float32)
        if thinned.max() > 0.5:
            strokes = thinned
    cx = sw / 2 + rng.uniform(-0.25, 0.25) * (sw - digit_h)
    cy = sh / 2 + rng.uniform(-0.25, 0.25) * (sh - digit_h)
    x0, y0 = int(cx - digit_h / 2), int(cy - digit_h / 2)
    ink[y0 : y0 + digit_h, x0 : x0 + digit_h] = strokes

    tone = rng.uniform(185, 250)
    tint = rng.uniform(-8, 8, 3)
    paper = np.empty((sh, sw, 3), dtype=np.float32)
    paper[:] = tone + tint
    paper += _noise(rng, (sh, sw, 1), rng.uniform(1, 5))
    if condition == "ruled" or rng.random() < 0.15:
        spacing = digit_h * rng.uniform(0.35, 0.7)
        lines = _rule_lines(sh, sw, spacing, squared=rng.random() < 0.4, rng=rng)
        line_rgb = np.array([rng.uniform(120, 190), rng.uniform(150, 200), rng.uniform(190, 230)])
        strength = rng.uniform(0.4, 0.8)
        paper = paper * (1 - strength * lines[..., None]) + (strength * lines)[..., None] * line_rgb
    blue = condition == "blue" or (condition != "paper" and rng.random() < 0.2)
    if blue:
        pen = np.array([rng.uniform(10, 60), rng.uniform(30, 80), rng.uniform(110, 190)])
    else:
        pen = np.full(3, rng.uniform(10, 60)) + rng.uniform(-5, 5, 3)
    # Pen pressure varies along the strokes.
    pressure = rng.uniform(0.75, 1.0) + 0.1 * cv2.resize(
        _noise(rng, (max(2, sh * 10 // digit_h), max(2, sw * 10 // digit_h)), 1.0), (sw, sh)
    )
    alpha = np.clip(ink * pressure, 0, 1)[..., None]
    sheet = np.asarray(paper * (1 - alpha) + pen * alpha, dtype=np.float32)

    angle = rng.uniform(-12, 12)
    scale = 1.0
    centre = (sw / 2, sh / 2)
    affine = cv2.getRotationMatrix2D(centre, angle, scale)
    affine[0, 2] += fw / 2 - sw / 2 + (rng.uniform(-0.08, 0.08) * fw if on_table else 0)
    affine[1, 2] += fh / 2 - sh / 2 + (rng.uniform(-0.08, 0.08) * fh if on_table else 0)
    src = np.array([[0, 0], [sw, 0], [sw, sh], [0, sh]], dtype=np.float32)
    dst = cv2.transform(src[None], affine)[0]
    dst += rng.uniform(-0.03, 0.03, dst.shape).astype(np.float32) * short
    warp = cv2.getPerspectiveTransform(src, dst.astype(np.float32))
    if on_table:
        table_tone = rng.uniform(25, 120)
        background = np.empty((fh, fw, 3), dtype=np.float32)
        background[:] = table_tone * np.array([1.0, rng.uniform(0.75, 1.0), rng.uniform(0.5, 0.9)])
        grain = np.asarray(
            cv2.resize(_noise(rng, (fh // 8 + 1, 4), 12.0), (fw, fh)), dtype=np.float32
        )
        background += grain[..., None] + _noise(rng, (fh, fw, 1), 4.0)
    else:
        background = np.zeros((fh, fw, 3), dtype=np.float32)
    photo = np.asarray(
        cv2.warpPerspective(
            sheet, warp, (fw, fh), dst=background, borderMode=cv2.BORDER_TRANSPARENT
        ),
        dtype=np.float32,
    )
    photo *= _illumination(fh, fw, rng)[..., None]
    sigma = rng.uniform(1.5, 3.5) * short / 480 if condition == "blur" else rng.uniform(0.3, 1.0)
    photo = np.asarray(cv2.GaussianBlur(photo, (0, 0), sigma), dtype=np.float32)
    photo += _noise(rng, photo.shape, rng.uniform(1.5, 5))
    rgb = np.clip(photo, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="JPEG", quality=int(rng.integers(60, 93)))
    return buf.getvalue()


def render_drawing(digit: UInt8Array, rng: np.random.Generator, canvas: int = 280) -> bytes:
    """A canvas export (PNG): `digit` as thick dark strokes on a transparent square, off-centre."""
    size = int(canvas * rng.uniform(0.3, 0.85))
    strokes = _pen_strokes(digit, size)
    width = max(1, int(size * rng.uniform(0.03, 0.08)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width))
    strokes = np.asarray(cv2.dilate(strokes, kernel), dtype=np.float32)
    alpha = np.zeros((canvas, canvas), dtype=np.float32)
    x0 = int(rng.integers(0, canvas - size + 1))
    y0 = int(rng.integers(0, canvas - size + 1))
    alpha[y0 : y0 + size, x0 : x0 + size] = strokes
    rgba = np.zeros((canvas, canvas, 4), dtype=np.uint8)
    rgba[..., :3] = np.array([int(rng.integers(0, 60))] * 3, dtype=np.uint8)
    rgba[..., 3] = np.clip(alpha * 255, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG")
    return buf.getvalue()
