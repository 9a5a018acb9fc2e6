"""MicroBatcher: gathers concurrent requests into one forward pass (asyncio).

Interface used by the web layer: `await batcher.start()`, `await batcher.predict(images)` with
an N×28×28 float32 array (one request's images) → list of `Prediction`, `await batcher.stop()`.

Greedy batching: one loop task takes whatever requests are queued (up to `max_batch_size`
images), runs them as one forward pass in a single inference thread, and hands each request its
slice. A lone request goes straight through; while a batch runs, new requests queue up and form
the next batch. When at least two requests were waiting (there is concurrency) and
`max_wait_ms` > 0, the loop waits up to that long for more to fill the batch. The service
default is 0 (purely greedy): on the measured CPU, ONNX Runtime's cost per image is flat from
batch 2 to 64, so a window only adds latency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from digitflow.inference import Classifier, Prediction


@dataclass
class _Request:
    images: npt.NDArray[np.float32]
    future: asyncio.Future[list[Prediction]] = field(repr=False)


class MicroBatcher:
    """Runs a `Classifier` off the event loop, batching concurrent requests."""

    def __init__(
        self,
        classifier: Classifier,
        max_batch_size: int = 64,
        max_wait_ms: float = 0.0,
        on_batch: Callable[[int], object] | None = None,
    ):
        """`on_batch`, if given, is called with the image count of every forward pass."""
        self.classifier = classifier
        self.on_batch = on_batch
        self.max_batch_size = max(1, max_batch_size)
        self.max_wait_ms = max_wait_ms
        self._queue: asyncio.Queue[_Request | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the batching loop (idempotent)."""
        if self._task is not None:
            return
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="digitflow-infer")
        self._task = asyncio.create_task(self._loop(), name="digitflow-microbatch")

    async def stop(self) -> None:
        """Finish queued requests, then stop the loop and the inference thread."""
        if self._task is None or self._queue is None:
            return
        await self._queue.put(None)
        await self._task
        self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def predict(self, images: npt.NDArray[np.float32]) -> list[Prediction]:
        """Predictions for one request's images, in order."""
        array = np.ascontiguousarray(images, dtype=np.float32).reshape(-1, 28, 28)
        if len(array) == 0:
            return []
        if self._queue is None:
            await self.start()
        assert self._queue is not None
        future: asyncio.Future[list[Prediction]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(array, future))
        return await future

    async def _loop(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            first = await queue.get()
            if first is None:
                break
            batch, stopping = await self._gather(first)
            await self._run(batch)
            if stopping:
                break
        # Drain anything left after the stop marker.
        while not queue.empty():
            item = queue.get_nowait()
            if item is not None:
                await self._run([item])

    async def _gather(self, first: _Request) -> tuple[list[_Request], bool]:
        """`first` plus the requests that fit: whatever is queued now, then, when at least two
        were waiting and `max_wait_ms` > 0, whatever arrives within that window.

        Returns the batch and whether the stop marker was seen. A request that would overflow
        the batch runs alone at once (keeps order simple).
        """
        assert self._queue is not None
        queue = self._queue
        batch, size = [first], len(first.images)
        deadline: float | None = None
        while size < self.max_batch_size:
            if not queue.empty():
                item = queue.get_nowait()
            else:
                if len(batch) < 2 or self.max_wait_ms <= 0:
                    break  # greedy: a lone request never waits
                loop = asyncio.get_running_loop()
                if deadline is None:
                    deadline = loop.time() + self.max_wait_ms / 1000
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
            if item is None:
                return batch, True
            if size + len(item.images) > self.max_batch_size:
                await self._run([item])
                continue
            batch.append(item)
            size += len(item.images)
        return batch, False

    async def _run(self, batch: list[_Request]) -> None:
        live = [r for r in batch if not r.future.done()]
        if not live:
            return
        images = live[0].images if len(live) == 1 else np.concatenate([r.images for r in live])
        if self.on_batch is not None:
            self.on_batch(len(images))
        loop = asyncio.get_running_loop()
        try:
            predictions = await loop.run_in_executor(
                self._executor, self.classifier.predict, images
            )
        except Exception as error:  # every caller of this batch gets it
            for request in live:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        start = 0
        for request in live:
            end = start + len(request.images)
            if not request.future.done():
                request.future.set_result(predictions[start:end])
            start = end
