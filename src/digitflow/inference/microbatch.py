"""MicroBatcher: gathers concurrent requests into one forward pass (asyncio).

Interface used by the web layer: `await batcher.start()`, `await batcher.predict(images)` with
an N×28×28 float32 array (one request's images) → list of `Prediction`, or
`await batcher.predict_deferred(count, prepare)` for images made only when their batch runs,
`await batcher.stop()`.

Greedy batching: one loop task takes whatever requests are queued (up to `max_batch_size`
images), runs them as one forward pass in a single inference thread, and hands each request its
slice. A lone request goes straight through; while a batch runs, new requests queue up and form
the next batch. When at least two requests were waiting (there is concurrency) and
`max_wait_ms` > 0, the loop waits up to that long for more to fill the batch. The service
default is 0 (purely greedy): on the measured CPU, ONNX Runtime's cost per image is flat from
batch 2 to 64, so a window only adds latency.

Idle fast path: with `inline_max_images` > 0, a request of at most that many images that finds
the batcher idle (nothing queued, no forward pass running) and, per `alone` (the server passes
"this worker holds one connection"), no other request coming, runs its forward pass right on
the event loop: for a lone client the two thread hand-offs cost more than a small forward pass.
With concurrency, requests queue and batch as above (running them inline one by one measured
25 % slower at 64 connections: while one runs, the others wait unread).

Where the forward pass runs: in one inference thread (the default), or, with `forward_on_loop`,
on the event loop itself. With one CPU inference thread per worker and a worker per core, the
thread overlaps nothing (the worker's core is busy either way) and every batch costs two thread
hand-offs and GIL switches; on the loop, the batching task first yields once, so requests whose
bytes arrived in the same turn of the loop join the batch. A GPU, or several inference threads,
want the thread: the loop keeps reading while the device works.

Deferred inputs: `predict_deferred` queues a callable instead of the array, and the batch calls
it on the event loop right before its forward pass. A batch's PNGs are then decoded in a row,
with the decoder's code and tables in cache, instead of one at a time between other requests'
work: 29–37 µs of server CPU a request less for digitflow at c=64 with one PNG a request
(`benchmarks/README.md`). An error the callable raises goes to its own caller; the rest of the
batch is answered.

Backpressure: at most `max_queued_images` images wait at once (`QueueFull` at once beyond that,
instead of a queue that grows without bound), and a request still unanswered `timeout_ms` after
it was queued gets `QueueTimeout` (its images are dropped from the batch if not yet run).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from digitflow.inference.classifier import Classifier, Prediction


class QueueFull(Exception):
    """The batch queue holds `max_queued_images` already: come back later."""


class QueueTimeout(Exception):
    """The request was not answered within `timeout_ms` of being queued."""


Prepare = Callable[[], npt.NDArray[np.float32]]


@dataclass
class _Request:
    count: int
    future: asyncio.Future[list[Prediction]] = field(repr=False)
    queued_at: float = 0.0
    images: npt.NDArray[np.float32] | None = None  # None until `prepare` has made them
    prepare: Prepare | None = field(default=None, repr=False)


def _prepared(prepare: Prepare, count: int) -> npt.NDArray[np.float32]:
    """What `prepare` makes, as N×28×28 float32, checked to hold the `count` images promised."""
    images = np.ascontiguousarray(prepare(), dtype=np.float32).reshape(-1, 28, 28)
    if len(images) != count:
        raise ValueError(f"prepared {len(images)} images, {count} were queued")
    return images


class MicroBatcher:
    """Runs a `Classifier` off the event loop, batching concurrent requests."""

    def __init__(
        self,
        classifier: Classifier,
        max_batch_size: int,
        max_wait_ms: float = 0.0,
        on_batch: Callable[[int], object] | None = None,
        max_queued_images: int | None = None,
        timeout_ms: float | None = None,
        on_wait: Callable[[float], object] | None = None,
        inline_max_images: int = 0,
        alone: Callable[[], bool] = lambda: True,
        forward_on_loop: bool = False,
    ):
        """`on_batch`, if given, is called with the image count of every forward pass and
        `on_wait` with each request's seconds in the queue; `None` limits mean unbounded;
        `inline_max_images` > 0 turns the idle fast path on and `forward_on_loop` runs every
        forward pass on the event loop (see the module docstring)."""
        self.classifier = classifier
        self.on_batch = on_batch
        self.on_wait = on_wait
        self.max_batch_size = max(1, max_batch_size)
        self.max_wait_ms = max_wait_ms
        self.max_queued_images = max_queued_images
        self.timeout_s = timeout_ms / 1000 if timeout_ms else None
        self.queued_images = 0
        self.inline_max_images = inline_max_images
        self.alone = alone
        self.forward_on_loop = forward_on_loop
        self._running = 0  # batches taken from the queue (or forward passes) not yet answered
        self._queue: asyncio.Queue[_Request | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the batching loop (idempotent)."""
        if self._task is not None:
            return
        self._queue = asyncio.Queue()
        if not self.forward_on_loop:
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
        """Predictions for one request's images, in order.

        Raises `QueueFull` when the queue has no room for them, `QueueTimeout` when they were
        not answered within `timeout_ms`.
        """
        array = np.ascontiguousarray(images, dtype=np.float32).reshape(-1, 28, 28)
        if len(array) == 0:
            return []
        return await self._submit(len(array), array, None)

    async def predict_deferred(self, count: int, prepare: Prepare) -> list[Prediction]:
        """Predictions for `count` images that `prepare()` makes (N×28×28 float32) only when
        their batch runs (see the module docstring); raises what `predict` raises, and what
        `prepare` raises."""
        if count <= 0:
            return []
        return await self._submit(count, None, prepare)

    async def _submit(
        self, count: int, images: npt.NDArray[np.float32] | None, prepare: Prepare | None
    ) -> list[Prediction]:
        if self._queue is None:
            await self.start()
        assert self._queue is not None
        if (
            count <= self.inline_max_images
            and not self._running
            and self._queue.empty()
            and self.alone()
        ):
            if images is None:
                assert prepare is not None
                images = _prepared(prepare, count)
            return self._run_inline(images)
        limit = self.max_queued_images
        if limit is not None and self.queued_images and self.queued_images + count > limit:
            raise QueueFull(f"{self.queued_images} images already queued (limit {limit})")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Prediction]] = loop.create_future()
        self.queued_images += count
        self._queue.put_nowait(_Request(count, future, loop.time(), images, prepare))
        if self.timeout_s is None:
            return await future
        timer = loop.call_later(self.timeout_s, _expire, future, self.timeout_s)
        try:
            return await future
        finally:
            timer.cancel()

    def _run_inline(self, images: npt.NDArray[np.float32]) -> list[Prediction]:
        """The idle fast path: one forward pass on the event loop's thread."""
        if self.on_wait is not None:
            self.on_wait(0.0)
        if self.on_batch is not None:
            self.on_batch(len(images))
        return self.classifier.predict(images)

    async def _loop(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            first = await queue.get()
            if first is None:
                break
            self._taken(first)
            self._running += 1  # taken: the idle fast path must not overtake it
            try:
                if self.forward_on_loop:
                    await asyncio.sleep(0)  # requests that arrived in this turn join the batch
                batch, stopping = await self._gather(first)
                await self._run(batch)
            finally:
                self._running -= 1
            if stopping:
                break
        # Drain anything left after the stop marker.
        while not queue.empty():
            item = queue.get_nowait()
            if item is not None:
                self._taken(item)
                await self._run([item])

    async def _gather(self, first: _Request) -> tuple[list[_Request], bool]:
        """`first` plus the requests that fit: whatever is queued now, then, when at least two
        were waiting and `max_wait_ms` > 0, whatever arrives within that window.

        Returns the batch and whether the stop marker was seen. A request that would overflow
        the batch runs alone at once (keeps order simple).
        """
        assert self._queue is not None
        queue = self._queue
        batch, size = [first], first.count
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
            self._taken(item)
            if size + item.count > self.max_batch_size:
                await self._run([item])
                continue
            batch.append(item)
            size += item.count
        return batch, False

    def _taken(self, request: _Request) -> None:
        """`request` left the queue: free its room and report how long it waited."""
        self.queued_images -= request.count
        if self.on_wait is not None:
            self.on_wait(asyncio.get_running_loop().time() - request.queued_at)

    async def _run(self, batch: list[_Request]) -> None:
        live = [r for r in batch if not r.future.done() and _made(r)]
        if not live:
            return
        inputs = [r.images for r in live if r.images is not None]
        images = inputs[0] if len(inputs) == 1 else np.concatenate(inputs)
        if self.on_batch is not None:
            self.on_batch(len(images))
        loop = asyncio.get_running_loop()
        self._running += 1
        try:
            if self._executor is None:
                predictions = self.classifier.predict(images)
            else:
                predictions = await loop.run_in_executor(
                    self._executor, self.classifier.predict, images
                )
        except Exception as error:  # every caller of this batch gets it
            for request in live:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        finally:
            self._running -= 1
        start = 0
        for request in live:
            end = start + request.count
            if not request.future.done():
                request.future.set_result(predictions[start:end])
            start = end


def _made(request: _Request) -> bool:
    """Make a deferred request's images; False (its caller has the error) if that fails."""
    if request.images is None:
        assert request.prepare is not None
        try:
            request.images = _prepared(request.prepare, request.count)
        except Exception as error:  # a bad upload: its own caller's answer, not the batch's
            request.future.set_exception(error)
            return False
        finally:
            request.prepare = None  # what it held (the uploads) can go now
    return True


def _expire(future: asyncio.Future[list[Prediction]], seconds: float) -> None:
    if not future.done():
        future.set_exception(QueueTimeout(f"not answered within {seconds * 1000:g} ms"))
