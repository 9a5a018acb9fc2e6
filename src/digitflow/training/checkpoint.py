"""Save and load the template's checkpoint format, safely.

Format (the template's): `{"model_state_dict", "epoch", "optimiser_state_dict", "train_loss",
"test_loss"}`. Loading uses `weights_only=True` (a pickle carrying code is refused without running
it), `map_location` (a GPU checkpoint loads on a CPU-only host), accepts a bare state dict too, and
returns the network in `eval()` mode.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from digitflow.atomic import write_atomically
from digitflow.errors import InvalidCheckpoint, ModelNotFound
from digitflow.training.net import Net

logger = logging.getLogger(__name__)


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    epoch: int,
    train_loss: float,
    test_loss: float,
) -> None:
    """Write the template's checkpoint dict atomically (temp file beside it, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model_state_dict": model.state_dict(),
        "epoch": epoch,
        "optimiser_state_dict": optimiser.state_dict(),
        "train_loss": train_loss,
        "test_loss": test_loss,
    }
    write_atomically(path, lambda out: torch.save(payload, out))


def read_state_dict(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The network weights stored at `path`, from either format, loaded without running code."""
    if not path.is_file():
        raise ModelNotFound(f"no checkpoint at {path}")
    try:
        obj: Any = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not zipfile.is_zipfile(path):
            # torch.save writes a zip archive; anything else is not a checkpoint at all.
            raise InvalidCheckpoint(
                f"{path}: not a readable PyTorch checkpoint (not the zip archive torch.save writes)"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidCheckpoint(f"{path}: refused by the weights-only loader ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidCheckpoint(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InvalidCheckpoint(f"{path}: holds neither a state dict nor the template's checkpoint")
    return {str(k): v for k, v in obj.items()}


def load_model(path: Path, device: torch.device | str = "cpu") -> Net:
    """Build `Net`, load the weights at `path` strictly, move it to `device`, and set `eval()`."""
    state = read_state_dict(path, device)
    model = Net()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InvalidCheckpoint(f"{path}: does not fit the network ({first})") from None
    model.to(device)
    model.eval()
    logger.info("loaded checkpoint", extra={"checkpoint": str(path), "device": str(device)})
    return model
