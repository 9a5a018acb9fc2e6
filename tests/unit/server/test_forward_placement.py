"""Where a worker's forward passes run: on its event loop only on a CPU with one thread."""

from __future__ import annotations

from typing import Any

import pytest

from digitflow_fastapi.app import forward_on_event_loop
from digitflow_fastapi.config import Settings


@pytest.mark.parametrize(
    ("overrides", "on_loop"),
    [
        ({"TORCH_THREADS": 1}, True),
        ({"TORCH_THREADS": 0, "WEB_CONCURRENCY": 1_000}, True),  # cores // workers, at least 1
        ({"TORCH_THREADS": 2}, False),
        ({"TORCH_THREADS": 1, "FORWARD_ON_EVENT_LOOP": False}, False),
        ({"TORCH_THREADS": 1, "USE_CUDA": True}, False),
        ({"TORCH_THREADS": 1, "USE_MPS": True}, False),
    ],
)
def test_the_forward_pass_runs_on_the_loop_only_on_a_cpu_with_one_thread(
    overrides: dict[str, Any], on_loop: bool
) -> None:
    assert forward_on_event_loop(Settings(**overrides)) is on_loop
