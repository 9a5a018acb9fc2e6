"""The digit locator's work is bounded on noise (issue 17, defect 4): past `max_components`
ink components an image reads as one without a digit, and the grouping of the pieces near the
main stroke is linear in them while taking exactly the pieces the original loop took."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from hypothesis import given, settings
from hypothesis import strategies as st

from digitflow.inference.digit_locator import _grow_group, locate_digit
from digitflow.inference.limits import DEFAULT_MAX_COMPONENTS


def _dot_grid(side: int, step: int, region: int | None = None) -> npt.NDArray[np.uint8]:
    gray = np.full((side, side), 255, np.uint8)
    lo = (side - (region or side)) // 2
    hi = lo + (region or side)
    gray[lo:hi:step, lo:hi:step] = 0
    return gray


def test_a_dense_dot_grid_reads_as_an_image_without_a_digit() -> None:
    # 65K dots: before the cap the locator grouped them for a quarter of a second into a "digit".
    assert not locate_digit(_dot_grid(512, 2)).any()


def test_the_component_cap_is_honoured_and_a_digit_under_it_is_found() -> None:
    gray = np.full((200, 200), 255, np.uint8)
    gray[40:160, 95:105] = 0  # a "1"
    gray[20:30, 20:30] = 0  # a speck
    assert locate_digit(gray).max() > 0.5
    assert locate_digit(gray, max_components=2).max() > 0.5
    assert not locate_digit(gray, max_components=1).any()
    assert DEFAULT_MAX_COMPONENTS >= 500  # real photos give at most ~120 (tests/test_photo_*)


def _reference_group(
    boxes: npt.NDArray[np.int64], mass: npt.NDArray[np.float64], main: int
) -> set[int]:
    """The grouping loop as it was before the cap (per-piece NumPy scalars)."""
    x0, y0 = boxes[main, 0], boxes[main, 1]
    x1, y1 = x0 + boxes[main, 2], y0 + boxes[main, 3]
    keep = {main}
    for _ in range(2):
        margin = max(2, int(0.3 * max(x1 - x0, y1 - y0)))
        for i in range(len(boxes)):
            if i in keep or mass[i] < 0.03 * mass[main]:
                continue
            bx, by, bw, bh = boxes[i]
            if (
                bx <= x1 + margin
                and bx + bw >= x0 - margin
                and by <= y1 + margin
                and (by + bh >= y0 - margin)
            ):
                keep.add(i)
                x0, y0 = min(x0, bx), min(y0, by)
                x1, y1 = max(x1, bx + bw), max(y1, by + bh)
    return keep


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 200),
            st.integers(0, 200),
            st.integers(1, 60),
            st.integers(1, 60),
            st.floats(0.0, 100.0),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_the_linear_grouping_takes_the_same_pieces_as_the_original_loop(
    pieces: list[tuple[int, int, int, int, float]],
) -> None:
    boxes = np.array([p[:4] for p in pieces], dtype=np.int64)
    mass = np.array([p[4] for p in pieces], dtype=np.float64)
    main = int(np.argmax(mass))
    assert _grow_group(boxes, mass, main) == _reference_group(boxes, mass, main)
