"""Device choice: CPU by default; CUDA / MPS when asked and present, else CPU with a warning."""

from __future__ import annotations

import logging

import pytest
import torch

from digitflow.device import device_from_name, select_device


def test_cpu_is_the_default() -> None:
    assert select_device() == torch.device("cpu")
    assert device_from_name("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")
def test_asking_for_cuda_without_it_falls_back_to_cpu_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="digitflow.device"):
        assert select_device(use_cuda=True) == torch.device("cpu")
    assert "CUDA requested but not available" in caplog.text


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this host has MPS")
def test_asking_for_mps_without_it_falls_back_to_cpu_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="digitflow.device"):
        assert device_from_name("mps") == torch.device("cpu")
    assert "MPS requested but not available" in caplog.text
