"""One epoch of training and one evaluation pass, returning typed metrics; nothing printed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from tqdm import tqdm

from digitflow.data.mnist import DigitSet
from digitflow.data.photo_training import PhotoSet


@dataclass(frozen=True)
class EpochMetrics:
    """Mean loss and accuracy over one pass."""

    loss: float
    accuracy: float


@dataclass(frozen=True)
class Augmentation:
    """Random affine jitter applied per batch: rotation (degrees), scale range, shift (pixels)."""

    max_rotation: float = 10.0
    min_scale: float = 0.9
    max_scale: float = 1.1
    max_shift: float = 2.0

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = images.shape[0]
        angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(self.max_rotation)
        scale = self.min_scale + torch.rand(n, generator=generator) * (
            self.max_scale - self.min_scale
        )
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * self.max_shift / 28)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
        ).to(images.device)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)


def train_one_epoch(
    model: nn.Module,
    data: DigitSet,
    optimiser: torch.optim.Optimizer,
    device: torch.device,
    batch_size: int,
    generator: torch.Generator,
    augmentation: Augmentation | None = None,
    progress: bool = False,
    description: str = "train",
    photos: PhotoSet | None = None,
) -> EpochMetrics:
    """Shuffle, (optionally) swap in photo renderings and augment, and fit one pass over `data`."""
    model.train()
    order = torch.randperm(len(data), generator=generator)
    total_loss, correct = 0.0, 0
    for start in tqdm(
        range(0, len(data), batch_size),
        desc=description,
        unit="batch",
        disable=not progress,
        leave=False,
    ):
        index = order[start : start + batch_size]
        images, labels = data.images[index], data.labels[index]
        if photos is not None:
            images = photos.swap(index, images, generator)
        if augmentation is not None:
            images = augmentation(images, generator)
        images, labels = images.to(device), labels.to(device)
        optimiser.zero_grad(set_to_none=True)
        output = model(images)
        loss = F.nll_loss(output, labels)
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        total_loss += float(loss.item()) * len(index)
        correct += int((output.argmax(1) == labels).sum().item())
    return EpochMetrics(loss=total_loss / len(data), accuracy=correct / len(data))


def predict_labels(
    model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 1000
) -> torch.Tensor:
    """Arg-max labels for N×1×28×28 `images` in eval mode."""
    model.eval()
    parts = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            parts.append(model(images[start : start + batch_size].to(device)).argmax(1).cpu())
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def evaluate(
    model: nn.Module, data: DigitSet, device: torch.device, batch_size: int = 1000
) -> EpochMetrics:
    """Mean NLL loss and accuracy of `model` on `data`, in eval mode, without gradients."""
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            images = data.images[start : start + batch_size].to(device)
            labels = data.labels[start : start + batch_size].to(device)
            output = model(images)
            total_loss += float(F.nll_loss(output, labels, reduction="sum").item())
            correct += int((output.argmax(1) == labels).sum().item())
    return EpochMetrics(loss=total_loss / len(data), accuracy=correct / len(data))
