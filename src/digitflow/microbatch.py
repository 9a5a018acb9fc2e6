"""MicroBatcher: gathers concurrent requests into one forward pass (asyncio).

Interface used by the web layer: `await batcher.start()`, `await batcher.predict(images)` with
an N×28×28 float32 array (one request's images) → list of `Prediction`, `await batcher.stop()`.
This first version runs each request's batch in a worker thread, unbatched across requests; the
performance issue replaces the inside with dynamic batching behind the same interface.
"""

from __future__ import annotations

import asyncio

import numpy as np
import numpy.typing as npt

from digitflow.inference import Classifier, Prediction


class MicroBatcher:
    """Runs a `Classifier` off the event loop, one call at a time."""

    def __init__(self, classifier: Classifier, max_batch_size: int = 64, max_wait_ms: float = 2.0):
        self.classifier = classifier
        self.max_batch_size = max_batch_size
        self.max_wait_ms = max_wait_ms
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Prepare to take requests."""

    async def stop(self) -> None:
        """Stop taking requests."""

    async def predict(self, images: npt.NDArray[np.float32]) -> list[Prediction]:
        """Predictions for one request's images, in order."""
        async with self._lock:
            return await asyncio.to_thread(self.classifier.predict, images)
