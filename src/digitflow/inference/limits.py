"""Defaults of the per-image decode limits, in a module that imports nothing heavy.

The server's settings take their defaults from here and from `image_structure`. The gunicorn
master reads those settings; importing `preprocess` or `digit_locator` for three numbers would load
numpy, OpenCV and Pillow into it, and every worker it forks would carry a copy.
"""

from __future__ import annotations

from typing import Final

# Width × height an image may declare (the server's MAX_IMAGE_PIXELS), checked from its header.
DEFAULT_MAX_IMAGE_PIXELS: Final = 20_000_000
# What the decoder may materialise for one image, in pixels (see `ImageProbe.work_pixels`): a
# digit needs a few hundred pixels a side, and this bounds one decode to ~20 MiB and ~50 ms.
DEFAULT_MAX_WORK_PIXELS: Final = 4 * 1024 * 1024
# Default most stroke components one image may split into; past it the image is noise (a dot
# grid, sensor grain), not a digit, and reads as an image without one. Real photos, scans and
# drawings of a digit give tens to a few hundred at most.
DEFAULT_MAX_COMPONENTS: Final = 1000
