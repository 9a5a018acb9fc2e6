"""MicroBatcher: each caller gets its own answer, batching happens under load, errors propagate."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

from digitflow.inference.classifier import Classifier, Prediction
from digitflow.inference.microbatch import MicroBatcher, QueueFull, QueueTimeout
from tests.support.gunicorn_server import TrainedModel


class Recorder:
    """Wraps a classifier, records batch sizes, can block or fail on demand."""

    def __init__(self, inner: Classifier) -> None:
        self.inner = inner
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on: int | None = None
        self.threads: list[str] = []

    def predict(self, batch: npt.NDArray[np.float32]) -> list[Prediction]:
        self.gate.wait()
        self.sizes.append(len(batch))
        self.threads.append(threading.current_thread().name)
        if self.fail_on is not None and len(batch) == self.fail_on:
            raise RuntimeError("boom")
        return self.inner.predict(batch)


def _images(n: int, seed: int) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).random((n, 28, 28), dtype=np.float32)


@pytest.fixture
def recorder(trained_model: TrainedModel) -> Recorder:
    return Recorder(Classifier.from_checkpoint(trained_model.model_path))


def test_a_lone_request_goes_straight_through(recorder: Recorder) -> None:
    async def run() -> list[Prediction]:
        batcher = MicroBatcher(recorder, max_batch_size=64, max_wait_ms=10_000)  # type: ignore[arg-type]
        await batcher.start()
        try:
            return await batcher.predict(_images(3, 0))
        finally:
            await batcher.stop()

    result = asyncio.run(run())  # a 10 s window would hang here if it were applied
    assert recorder.sizes == [3]
    assert [p.label for p in result] == [p.label for p in recorder.inner.predict(_images(3, 0))]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(
    recorder: Recorder,
) -> None:
    requests = [_images(1 + i % 3, i) for i in range(20)]
    expected = [[p.label for p in recorder.inner.predict(r)] for r in requests]

    async def run() -> list[list[Prediction]]:
        batcher = MicroBatcher(recorder, max_batch_size=64)  # type: ignore[arg-type]
        await batcher.start()
        recorder.gate.clear()  # hold the first batch so the others queue behind it
        tasks = [asyncio.create_task(batcher.predict(r)) for r in requests]
        await asyncio.sleep(0)
        while not batcher._queue or batcher._queue.qsize() < len(requests) - 1:
            await asyncio.sleep(0.01)
        recorder.gate.set()
        out = await asyncio.gather(*tasks)
        await batcher.stop()
        return out

    results = asyncio.run(run())
    assert [[p.label for p in r] for r in results] == expected
    assert sum(recorder.sizes) == sum(len(r) for r in requests)
    assert len(recorder.sizes) < len(requests)  # fewer forward passes than requests
    assert max(recorder.sizes) > 3


def test_with_a_wait_window_concurrent_requests_wait_for_latecomers(recorder: Recorder) -> None:
    async def run(wait_ms: float) -> list[int]:
        recorder.sizes = []
        batcher = MicroBatcher(recorder, max_batch_size=64, max_wait_ms=wait_ms)  # type: ignore[arg-type]
        await batcher.start()
        first = [asyncio.create_task(batcher.predict(_images(1, i))) for i in range(2)]
        await asyncio.sleep(0.1)  # a latecomer, inside a 2 s window but after a greedy pass
        late = asyncio.create_task(batcher.predict(_images(1, 9)))
        await asyncio.gather(*first, late)
        await batcher.stop()
        return recorder.sizes

    assert asyncio.run(run(2000)) == [3]  # one forward pass for all three
    assert asyncio.run(run(0)) == [2, 1]  # greedy: the latecomer goes in the next pass


def test_an_error_reaches_the_callers_of_that_batch_only(recorder: Recorder) -> None:
    recorder.fail_on = 5

    async def run() -> tuple[object, list[Prediction]]:
        batcher = MicroBatcher(recorder, max_batch_size=64)  # type: ignore[arg-type]
        await batcher.start()
        bad = await asyncio.gather(batcher.predict(_images(5, 1)), return_exceptions=True)
        good = await batcher.predict(_images(2, 2))
        await batcher.stop()
        return bad[0], good

    bad, good = asyncio.run(run())
    assert isinstance(bad, RuntimeError)
    assert len(good) == 2


def test_a_cancelled_request_does_not_break_the_loop(recorder: Recorder) -> None:
    async def run() -> list[Prediction]:
        batcher = MicroBatcher(recorder, max_batch_size=64)  # type: ignore[arg-type]
        await batcher.start()
        recorder.gate.clear()
        first = asyncio.create_task(batcher.predict(_images(1, 3)))
        doomed = asyncio.create_task(batcher.predict(_images(4, 4)))
        await asyncio.sleep(0.05)
        doomed.cancel()
        recorder.gate.set()
        await first
        out = await batcher.predict(_images(2, 5))
        await batcher.stop()
        return out

    assert len(asyncio.run(run())) == 2
    assert 4 not in recorder.sizes


def test_stop_finishes_queued_requests(recorder: Recorder) -> None:
    async def run() -> list[list[Prediction]]:
        batcher = MicroBatcher(recorder, max_batch_size=64)  # type: ignore[arg-type]
        await batcher.start()
        recorder.gate.clear()
        tasks = [asyncio.create_task(batcher.predict(_images(1, i))) for i in range(5)]
        await asyncio.sleep(0.05)
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0.01)
        recorder.gate.set()
        await stopping
        return [t.result() for t in tasks]

    assert [len(r) for r in asyncio.run(run())] == [1] * 5


def test_a_full_queue_refuses_at_once_and_frees_room_as_batches_run(recorder: Recorder) -> None:
    async def run() -> tuple[list[object], list[Prediction]]:
        batcher = MicroBatcher(recorder, max_batch_size=64, max_queued_images=4)  # type: ignore[arg-type]
        await batcher.start()
        recorder.gate.clear()  # the first batch holds the inference thread
        running = asyncio.create_task(batcher.predict(_images(1, 0)))
        await asyncio.sleep(0.05)
        queued = [asyncio.create_task(batcher.predict(_images(2, i))) for i in (1, 2)]
        await asyncio.sleep(0.05)
        refused = await asyncio.gather(batcher.predict(_images(1, 3)), return_exceptions=True)
        recorder.gate.set()
        results = await asyncio.gather(running, *queued, return_exceptions=True)
        after = await batcher.predict(_images(3, 4))  # room again once the queue emptied
        await batcher.stop()
        return [*refused, *results], after

    outcomes, after = asyncio.run(run())
    assert isinstance(outcomes[0], QueueFull)
    assert [len(o) for o in outcomes[1:]] == [1, 2, 2]  # type: ignore[arg-type]
    assert len(after) == 3


def test_a_request_larger_than_the_queue_bound_still_runs_when_the_queue_is_empty(
    recorder: Recorder,
) -> None:
    async def run() -> list[Prediction]:
        batcher = MicroBatcher(recorder, max_batch_size=64, max_queued_images=4)  # type: ignore[arg-type]
        try:
            return await batcher.predict(_images(10, 0))
        finally:
            await batcher.stop()

    assert len(asyncio.run(run())) == 10


def test_a_request_unanswered_past_the_timeout_gets_queue_timeout_and_is_not_run(
    recorder: Recorder,
) -> None:
    waits: list[float] = []

    async def run() -> list[object]:
        batcher = MicroBatcher(
            recorder,  # type: ignore[arg-type]
            max_batch_size=64,
            timeout_ms=100,
            on_wait=waits.append,
        )
        await batcher.start()
        recorder.gate.clear()
        first = asyncio.create_task(batcher.predict(_images(1, 0)))
        await asyncio.sleep(0.02)
        late = asyncio.create_task(batcher.predict(_images(7, 1)))
        await asyncio.sleep(0.3)  # both past 100 ms: the first is running, the second queued
        recorder.gate.set()
        outcomes = await asyncio.gather(first, late, return_exceptions=True)
        await batcher.stop()
        return list(outcomes)

    first, late = asyncio.run(run())
    assert isinstance(first, QueueTimeout) and isinstance(late, QueueTimeout)
    assert 7 not in recorder.sizes  # expired while queued: never sent to the model
    assert len(waits) == 2 and max(waits) >= 0.1


def test_a_lone_small_request_runs_on_the_event_loop_and_others_in_the_inference_thread(
    recorder: Recorder,
) -> None:
    async def run(inline: int, alone: bool = True) -> list[list[Prediction]]:
        batcher = MicroBatcher(
            recorder,  # type: ignore[arg-type]
            max_batch_size=64,
            inline_max_images=inline,
            alone=lambda: alone,
        )
        await batcher.start()
        out = [await batcher.predict(_images(1, 0)), await batcher.predict(_images(3, 1))]
        await batcher.stop()
        return out

    inline = asyncio.run(run(1))
    loop_thread = threading.current_thread().name  # asyncio.run's loop runs in this thread
    assert recorder.threads[0] == loop_thread
    assert recorder.threads[1].startswith("digitflow-infer")
    recorder.threads.clear()
    handed_off = asyncio.run(run(0))
    assert all(name.startswith("digitflow-infer") for name in recorder.threads)
    recorder.threads.clear()
    asyncio.run(run(1, alone=False))  # another request in flight: batch, do not block the loop
    assert all(name.startswith("digitflow-infer") for name in recorder.threads)
    assert [[p.label for p in r] for r in inline] == [[p.label for p in r] for r in handed_off]


def test_a_small_request_queues_behind_a_running_forward_pass_instead_of_running_inline(
    recorder: Recorder,
) -> None:
    async def run() -> None:
        batcher = MicroBatcher(recorder, max_batch_size=64, inline_max_images=8)  # type: ignore[arg-type]
        await batcher.start()
        recorder.gate.clear()  # the first (9 images, too many for inline) blocks in the thread
        first = asyncio.create_task(batcher.predict(_images(9, 0)))
        while not batcher._running:
            await asyncio.sleep(0.01)
        second = asyncio.create_task(batcher.predict(_images(1, 1)))
        third = asyncio.create_task(batcher.predict(_images(1, 2)))
        await asyncio.sleep(0.05)
        recorder.gate.set()
        await asyncio.gather(first, second, third)
        await batcher.stop()

    asyncio.run(run())
    assert recorder.sizes == [9, 2]  # the two small ones were batched after it, not run inline
    assert all(name.startswith("digitflow-infer") for name in recorder.threads)


def test_forward_on_loop_batches_on_the_event_loop_with_no_inference_thread(
    recorder: Recorder,
) -> None:
    requests = [_images(1 + i % 3, i) for i in range(12)]
    expected = [[p.label for p in recorder.inner.predict(r)] for r in requests]

    async def late(batcher: MicroBatcher, images: npt.NDArray[np.float32]) -> list[Prediction]:
        await asyncio.sleep(0)  # arrives one turn of the loop after the first request
        return await batcher.predict(images)

    async def run() -> tuple[list[list[Prediction]], list[str]]:
        batcher = MicroBatcher(recorder, max_batch_size=64, forward_on_loop=True)  # type: ignore[arg-type]
        await batcher.start()
        first = asyncio.create_task(batcher.predict(requests[0]))
        rest = [asyncio.create_task(late(batcher, r)) for r in requests[1:]]
        answers = await asyncio.gather(first, *rest)
        names = [t.name for t in threading.enumerate()]
        await batcher.stop()
        return answers, names

    answers, threads = asyncio.run(run())
    loop_thread = threading.current_thread().name
    assert recorder.threads == [loop_thread] * len(recorder.threads)
    assert not any(name.startswith("digitflow-infer") for name in threads)
    assert recorder.sizes == [sum(len(r) for r in requests)]  # the late ones joined the batch
    assert [[p.label for p in a] for a in answers] == expected


def test_forward_on_loop_gives_a_failing_batch_s_error_to_each_caller(recorder: Recorder) -> None:
    recorder.fail_on = 5

    async def run() -> list[list[Prediction] | BaseException]:
        batcher = MicroBatcher(recorder, max_batch_size=64, forward_on_loop=True)  # type: ignore[arg-type]
        await batcher.start()
        tasks = [batcher.predict(_images(2, 0)), batcher.predict(_images(3, 1))]
        out = await asyncio.gather(*tasks, return_exceptions=True)
        after = await batcher.predict(_images(1, 2))  # the loop survives the failure
        await batcher.stop()
        return [*out, after]

    first, second, after = asyncio.run(run())
    assert isinstance(first, RuntimeError) and isinstance(second, RuntimeError)
    assert isinstance(after, list) and len(after) == 1


def test_a_request_taken_from_the_queue_is_not_overtaken_by_the_idle_fast_path(
    recorder: Recorder,
) -> None:
    async def late_single(batcher: MicroBatcher) -> list[Prediction]:
        await asyncio.sleep(0)  # arrives while the batching task holds the first request
        return await batcher.predict(_images(1, 1))

    async def run() -> None:
        batcher = MicroBatcher(
            recorder,  # type: ignore[arg-type]
            max_batch_size=64,
            inline_max_images=1,
            forward_on_loop=True,
        )
        await batcher.start()
        await asyncio.gather(batcher.predict(_images(2, 0)), late_single(batcher))
        await batcher.stop()

    asyncio.run(run())
    assert recorder.sizes == [3]  # one batch, in arrival order; not [1, 2]


def test_deferred_images_are_made_when_their_batch_runs_and_a_bad_one_fails_only_its_caller(
    recorder: Recorder,
) -> None:
    requests = [_images(1 + i % 2, i) for i in range(6)]
    expected = [[p.label for p in recorder.inner.predict(r)] for r in requests]
    made: list[int] = []

    def maker(index: int) -> Callable[[], npt.NDArray[np.float32]]:
        def make() -> npt.NDArray[np.float32]:
            made.append(index)
            if index == 3:
                raise ValueError("image 3 does not decode")
            return requests[index]

        return make

    async def run() -> tuple[list[object], list[int], list[Prediction]]:
        batcher = MicroBatcher(recorder, max_batch_size=64, forward_on_loop=True)  # type: ignore[arg-type]
        await batcher.start()
        tasks = [
            asyncio.create_task(batcher.predict_deferred(len(r), maker(i)))
            for i, r in enumerate(requests)
        ]
        await asyncio.sleep(0)  # all queued, none made yet
        made_when_queued = list(made)
        out = await asyncio.gather(*tasks, return_exceptions=True)
        after = await batcher.predict(_images(1, 9))  # the loop goes on
        await batcher.stop()
        return out, made_when_queued, after

    out, made_when_queued, after = asyncio.run(run())
    assert made_when_queued == []
    assert sorted(made) == list(range(6))
    assert isinstance(out[3], ValueError)
    for index, answer in enumerate(out):
        if index != 3:
            assert isinstance(answer, list)
            assert [p.label for p in answer] == expected[index]
    good = sum(len(r) for i, r in enumerate(requests) if i != 3)
    assert recorder.sizes == [good, 1]  # one forward pass for the five good ones, then `after`
    assert len(after) == 1


def test_a_deferred_request_that_makes_another_count_of_images_than_it_promised_is_refused(
    recorder: Recorder,
) -> None:
    async def run() -> list[object]:
        batcher = MicroBatcher(recorder, max_batch_size=64, inline_max_images=1)  # type: ignore[arg-type]
        await batcher.start()
        out = await asyncio.gather(
            batcher.predict_deferred(1, lambda: _images(2, 0)),  # idle fast path
            batcher.predict_deferred(2, lambda: _images(1, 1)),  # queued
            return_exceptions=True,
        )
        await batcher.stop()
        return out

    first, second = asyncio.run(run())
    assert isinstance(first, ValueError) and isinstance(second, ValueError)
    assert recorder.sizes == []  # neither reached the model
