"""Choosing the torch device: CPU by default, CUDA or MPS when asked for and present."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def select_device(use_cuda: bool = False, use_mps: bool = False) -> torch.device:
    """CUDA or MPS when requested and available, else CPU (with a warning if one was requested)."""
    if use_cuda:
        if torch.cuda.is_available():
            return torch.device("cuda")
        logger.warning("CUDA requested but not available; using the CPU")
    if use_mps:
        if torch.backends.mps.is_available():
            return torch.device("mps")
        logger.warning("MPS requested but not available; using the CPU")
    return torch.device("cpu")


def device_from_name(name: str) -> torch.device:
    """Map a config value (`cpu`, `cuda`, `mps`, `auto`) to an available device."""
    name = name.lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return select_device(use_cuda=name == "cuda", use_mps=name == "mps")
