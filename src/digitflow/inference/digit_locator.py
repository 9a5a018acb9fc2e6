"""Find the handwritten digit in a photo, scan or drawing and lay it out the MNIST way.

The steps (OpenCV, on a grayscale image of at most `WORK_SIDE` px a side):

1. Polarity: dark ink on light paper (photos, scans, canvas exports) or a light digit on a dark
   ground (MNIST-like renderings); the second is inverted into the first.
2. Illumination: the paper's own brightness is estimated by a morphological closing (it erases
   anything darker and narrower than the kernel, i.e. the strokes) on a reduced copy. Ink is how
   much darker than that estimate a pixel is, relative to the paper's brightness. Gradients and
   shadows cancel out, and a dark table around the sheet is not ink: it is part of the estimate.
3. Strokes: pixels clearly darker than the paper (a fraction of the darkest ink, so faint printed
   ruled lines and grain drop out), grouped into connected components; the digit is the component
   with the most ink plus the pieces close to it (a 5's hat, a broken 4).
4. MNIST normalisation: stroke width brought to MNIST's proportion, fitted into a 20×20 box keeping
   the aspect ratio, centred by mass in 28×28.
"""

from __future__ import annotations

from typing import Any, Final

import cv2
import numpy as np
import numpy.typing as npt

from digitflow.inference.limits import DEFAULT_MAX_COMPONENTS

MNIST_SIZE: Final = 28
MNIST_BOX: Final = 20
# Stroke width over the digit's longer side, measured (2·area/boundary) on the training PNGs.
MNIST_STROKE_RATIO: Final = 0.13
# Pixels darker than the paper by less than this share of the darkest ink are not strokes.
INK_FRACTION: Final = 0.4
MIN_INK: Final = 0.08
# A paper estimate changing by more than this share of the paper level per pixel is a sheet edge.
EDGE_FRACTION: Final = 0.25
# Ink this dark touching the frame is table or shadow (printed lines are fainter).
FRAME_INK: Final = 0.3
# A component whose stroke width exceeds this share of its longer side is a blob, not a stroke.
BLOB_RATIO: Final = 0.4

UInt8Array = npt.NDArray[np.uint8]
FloatArray = npt.NDArray[np.float32]


def _disk(size: int) -> UInt8Array:
    return np.asarray(cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)), dtype=np.uint8)


def _empty() -> FloatArray:
    return np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.float32)


def is_dark_on_light(gray: UInt8Array) -> bool:
    """True for dark ink on light paper (with or without a darker table around the sheet)."""
    small = cv2.resize(gray, (64, 64), interpolation=cv2.INTER_AREA) if gray.size > 4096 else gray
    border = np.concatenate([small[0], small[-1], small[:, 0], small[:, -1]])
    if float(border.mean()) >= 127.5:
        return True
    _, bright = cv2.threshold(small, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    if np.count_nonzero(bright) >= 0.5 * bright.size:
        return True
    # A sheet of paper on a dark table: one big, solid (convex) bright region.
    count, labels, stats, _ = cv2.connectedComponentsWithStats(bright, connectivity=8)
    if count < 2:
        return False
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    area = int(stats[largest, cv2.CC_STAT_AREA])
    if area < 0.15 * bright.size:
        return False
    points = cv2.findNonZero((labels == largest).astype(np.uint8))
    hull_area = float(cv2.contourArea(cv2.convexHull(points)))
    return hull_area > 0 and area / hull_area >= 0.85


def ink_map(gray: UInt8Array) -> FloatArray:
    """How much darker than the local paper each pixel is, relative to the paper's brightness.

    Where the paper estimate itself changes sharply (the edge of the sheet against a table) no
    pixel counts as ink: there the estimate is blurred by the reduction, not the paper's own.
    """
    h, w = gray.shape
    factor = max(1, max(h, w) // 128)
    small = cv2.resize(
        gray, (max(1, w // factor), max(1, h // factor)), interpolation=cv2.INTER_AREA
    )
    side = max(3, (max(small.shape) // 3) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
    paper = cv2.morphologyEx(small, cv2.MORPH_CLOSE, kernel, borderType=cv2.BORDER_REPLICATE)
    level = max(float(np.percentile(paper, 95)), 32.0)
    edges = cv2.morphologyEx(paper, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
    sheet_edge = cv2.dilate(
        (edges > EDGE_FRACTION * level).astype(np.uint8), np.ones((7, 7), np.uint8)
    )
    paper = cv2.GaussianBlur(paper, (0, 0), 1.0)
    background = cv2.resize(paper, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    ink = np.asarray(np.clip((background - gray) / level, 0.0, 1.0), dtype=np.float32)
    if sheet_edge.any():
        ink[cv2.resize(sheet_edge, (w, h), interpolation=cv2.INTER_NEAREST) > 0] = 0.0
    return ink


def _grow_group(boxes: npt.NDArray[np.int64], mass: npt.NDArray[Any], main: int) -> set[int]:
    """The main component plus the pieces near it (a 5's hat, a broken 4), grown twice.

    Each pass takes, in index order, every piece with enough mass whose box touches the group's
    box widened by a margin, widening the box as it goes. The mass test is vectorised and the
    pass runs over plain ints: linear in the components, microseconds each (NumPy scalars cost
    ~30× more per piece, which made noise of thousands of pieces take tenths of a second).
    """
    x0, y0, w0, h0 = (int(v) for v in boxes[main])
    x1, y1 = x0 + w0, y0 + h0
    candidates = np.flatnonzero(mass >= 0.03 * mass[main])
    pieces = [
        (int(i), bx, by, bx + bw, by + bh)
        for i, (bx, by, bw, bh) in zip(candidates.tolist(), boxes[candidates].tolist(), strict=True)
        if i != main
    ]
    keep = {main}
    for _ in range(2):  # pieces near pieces near the main stroke
        margin = max(2, int(0.3 * max(x1 - x0, y1 - y0)))
        for i, left, top, right, bottom in pieces:
            if i in keep:
                continue
            if (
                left <= x1 + margin
                and right >= x0 - margin
                and top <= y1 + margin
                and (bottom >= y0 - margin)
            ):
                keep.add(i)
                x0, y0 = min(x0, left), min(y0, top)
                x1, y1 = max(x1, right), max(y1, bottom)
    return keep


def select_digit(
    ink: FloatArray, max_components: int = DEFAULT_MAX_COMPONENTS
) -> npt.NDArray[np.bool_] | None:
    """The stroke pixels of the digit: the component with most ink and the pieces near it.

    None when there is no ink, or more than `max_components` stroke components (noise)."""
    smooth = cv2.GaussianBlur(ink, (0, 0), 1.0)
    peak = float(smooth.max())
    if peak < MIN_INK:
        return None
    # The darkest ink should be the digit's, not a table strip the paper estimate missed: take
    # the peak away from clearly dark regions that touch the frame, when anything is left.
    dark = (smooth > FRAME_INK).astype(np.uint8)
    n_dark, dark_labels = cv2.connectedComponents(dark, connectivity=8)
    if n_dark > 1:
        edge_ids = np.unique(
            np.concatenate([dark_labels[0], dark_labels[-1], dark_labels[:, 0], dark_labels[:, -1]])
        )
        inside = ~np.isin(dark_labels, edge_ids[edge_ids > 0])
        inner_peak = float(smooth[inside].max()) if inside.any() else 0.0
        if inner_peak >= 2 * MIN_INK:
            peak = inner_peak
    strokes = (ink > max(MIN_INK, INK_FRACTION * peak)).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(strokes, connectivity=8)
    if count < 2 or count - 1 > max_components:
        return None
    mass = np.bincount(labels.ravel(), weights=ink.ravel(), minlength=count)[1:]
    boxes = stats[1:, :4].astype(np.int64)  # x, y, w, h
    height, width = ink.shape
    # Pieces touching the frame are table, sheet edge or shadow, not the digit someone framed.
    at_frame = (
        (boxes[:, 0] == 0)
        | (boxes[:, 1] == 0)
        | (boxes[:, 0] + boxes[:, 2] >= width)
        | (boxes[:, 1] + boxes[:, 3] >= height)
    )
    # Solid blobs (a shadow wedge, a patch of table) are not pen strokes: their width is a large
    # share of their size, where a digit's strokes are ~0.13 of it (thick drawings ~0.3).
    inner = cv2.erode(
        strokes, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0
    )
    edge = np.bincount(labels[(strokes > 0) & (inner == 0)], minlength=count)[1:]
    areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    widths = 2.0 * areas / np.maximum(edge, 1)
    blob = (widths > BLOB_RATIO * boxes[:, 2:4].max(axis=1)) & (areas > 16)
    rejected = at_frame | blob
    if not rejected.all():
        mass = np.where(rejected, 0.0, mass)
    keep = _grow_group(boxes, mass, int(np.argmax(mass)))
    selected = np.isin(labels, np.fromiter((k + 1 for k in keep), dtype=np.int32))
    return np.asarray(selected, dtype=np.bool_)


def stroke_width(mask: UInt8Array) -> float:
    """Mean stroke width of a binary drawing: twice its area over its boundary length."""
    area = int(np.count_nonzero(mask))
    inner = cv2.erode(
        mask, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0
    )
    boundary = area - int(np.count_nonzero(inner))
    return 2.0 * area / boundary if boundary else 1.0


def mnist_layout(digit: FloatArray) -> FloatArray:
    """A cropped digit (ink in [0, 1]) → 28×28: 20×20 box, aspect kept, centred by mass."""
    height, width = digit.shape
    scale = MNIST_BOX / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    small = cv2.resize(digit, (new_w, new_h), interpolation=cv2.INTER_AREA)
    total = float(small.sum())
    if total <= 0:
        return _empty()
    ys, xs = np.indices(small.shape)
    cy = float((ys * small).sum() / total)
    cx = float((xs * small).sum() / total)
    top = min(max(round(MNIST_SIZE / 2 - cy), 0), MNIST_SIZE - new_h)
    left = min(max(round(MNIST_SIZE / 2 - cx), 0), MNIST_SIZE - new_w)
    canvas = _empty()
    canvas[top : top + new_h, left : left + new_w] = small
    return np.clip(canvas, 0.0, 1.0)


def locate_digit(gray: UInt8Array, max_components: int = DEFAULT_MAX_COMPONENTS) -> FloatArray:
    """Grayscale image (any polarity, ≤ a few hundred px a side) → the model's 28×28 input.

    An image without a digit (no ink, or noise of more than `max_components` pieces) gives the
    blank 28×28 input."""
    if cv2.getNumThreads() != 1:
        # Sub-millisecond operations: OpenCV's thread pool only adds contention with the
        # server's and torch's own threads.
        cv2.setNumThreads(1)
    if not is_dark_on_light(gray):
        gray = 255 - gray
    ink = ink_map(gray)
    selected = select_digit(ink, max_components)
    if selected is None:
        return _empty()
    rows = np.flatnonzero(selected.any(axis=1))
    cols = np.flatnonzero(selected.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    mask = selected[r0:r1, c0:c1].astype(np.uint8)
    # Keep the soft edges of the chosen strokes, nothing else.
    near = cv2.dilate(mask, np.ones((3, 3), np.uint8))
    crop = ink[r0:r1, c0:c1] * near
    level = float(np.percentile(crop[mask > 0], 75))
    crop = np.clip(crop / max(level, 1e-3), 0.0, 1.0)

    target = MNIST_STROKE_RATIO * max(crop.shape)
    width = stroke_width(mask)
    pad = int(max(0.0, target - width)) + 2
    crop = cv2.copyMakeBorder(crop, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    if width < target - 1:
        k = round(target - width) | 1
        crop = np.asarray(cv2.dilate(crop, _disk(k)), dtype=np.float32)
    elif width > 1.6 * target:
        k = round(width - target) | 1
        crop = np.asarray(cv2.erode(crop, _disk(k)), dtype=np.float32)
    rows = np.flatnonzero(crop.max(axis=1) > 0.05)
    cols = np.flatnonzero(crop.max(axis=0) > 0.05)
    if rows.size == 0:
        return _empty()
    return mnist_layout(crop[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
