"""Domain randomisation: photo-like renderings of the TRAINING split, mixed into training batches.

A share of the training images is rendered once per run as phone photos (`photo_synth`, every
condition in turn, seeded by the run's seed) and put through THE transform (`bytes_to_input`), so
the model learns from exactly what the preprocessing makes of a photo. During training, each image
of a batch is swapped for its photo rendering with probability `rate`; the epoch stays as long.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import torch

from digitflow.data.photo_synth import CONDITIONS, render_photo
from digitflow.inference.preprocess import bytes_to_input

# Training renders are small photos: cheap to make, and the digit finder sees low-resolution
# strokes too (the benchmark's photos are 480×640 and 1200×1600).
TRAINING_FRAME: Final = (160, 120)


@dataclass(frozen=True)
class PhotoSet:
    """Photo renderings of some training images: `slot[i]` is the row of image i in `inputs`
    (-1 when image i has none); `rate` is the chance an image with one is swapped in a batch."""

    slot: torch.Tensor
    inputs: torch.Tensor
    rate: float

    def swap(
        self, index: torch.Tensor, images: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """The batch `images` (training rows `index`) with some images replaced by their photo."""
        slots = self.slot[index]
        chosen = (slots >= 0) & (torch.rand(len(index), generator=generator) < self.rate)
        if not bool(chosen.any()):
            return images
        images = images.clone()
        images[chosen] = self.inputs[slots[chosen]]
        return images


def render_photo_set(images: torch.Tensor, count: int, rate: float, seed: int) -> PhotoSet:
    """Render `count` of the N×1×28×28 training `images` as photos and preprocess them."""
    count = min(count, images.shape[0])
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(images.shape[0])[:count])
    digits = (images[torch.from_numpy(chosen), 0].numpy() * 255).round().astype(np.uint8)
    inputs = (
        np.stack(
            [
                bytes_to_input(
                    render_photo(digit, CONDITIONS[i % len(CONDITIONS)], rng, TRAINING_FRAME)
                )
                for i, digit in enumerate(digits)
            ]
        )
        if count
        else np.zeros((0, 28, 28), dtype=np.float32)
    )
    slot = torch.full((images.shape[0],), -1, dtype=torch.long)
    slot[torch.from_numpy(chosen)] = torch.arange(count)
    return PhotoSet(slot=slot, inputs=torch.from_numpy(inputs).unsqueeze(1), rate=rate)
