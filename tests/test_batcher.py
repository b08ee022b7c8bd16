"""Dynamic batching: batches bounded, every image answered with its own result, sessions used at once."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from cxr.serve.batcher import DynamicBatcher


class SlowPredictor:
    """Scores a batch in 50 ms; each image's probabilities are its own pixel value."""

    backend, metadata = "fake", {}

    def __init__(self, concurrency: int, fail_first: bool = False):
        self.concurrency, self.fail_first = concurrency, fail_first
        self.active = self.peak = self.calls = 0
        self.lock = threading.Lock()

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            self.active, self.calls = self.active + 1, self.calls + 1
            self.peak, first = max(self.peak, self.active), self.calls == 1
        time.sleep(0.05)
        with self.lock:
            self.active -= 1
        if first and self.fail_first:
            raise RuntimeError("model failed")
        values = batch.reshape(len(batch), -1)[:, :1].astype(np.float32)
        return np.repeat(values, 14, axis=1), np.repeat(values, 512, axis=1)


async def score_all(predictor: SlowPredictor, count: int) -> list:
    batcher = DynamicBatcher(predictor, max_batch=4, max_wait_ms=1)
    batcher.start()
    images = [np.full((1, 8, 8), i, dtype=np.uint8) for i in range(count)]
    results = await asyncio.gather(*(batcher.submit(image) for image in images), return_exceptions=True)
    await batcher.stop()
    return results


@pytest.mark.parametrize("sessions", [1, 2])
def test_batches_run_on_every_session_and_answer_their_own_images(sessions):
    predictor = SlowPredictor(sessions)
    results = asyncio.run(score_all(predictor, 40))
    assert predictor.peak == sessions
    assert all(r.batch_size <= 4 for r in results)
    assert [int(r.probabilities[0]) for r in results] == list(range(40))


def test_a_failed_batch_fails_its_images_only():
    predictor = SlowPredictor(2, fail_first=True)
    results = asyncio.run(score_all(predictor, 12))
    failed = [r for r in results if isinstance(r, RuntimeError)]
    assert 1 <= len(failed) <= 4
    assert all(int(r.probabilities[0]) == i for i, r in enumerate(results) if not isinstance(r, Exception))


def test_a_lone_request_is_scored_at_once_not_after_the_wait():
    async def lone() -> list:
        batcher = DynamicBatcher(SlowPredictor(1), max_batch=4, max_wait_ms=600_000)  # a ten-minute wait
        batcher.start()
        image = np.zeros((1, 8, 8), dtype=np.uint8)
        results = [await asyncio.wait_for(batcher.submit(image), 30) for _ in range(2)]
        await batcher.stop()
        return results

    assert [r.batch_size for r in asyncio.run(lone())] == [1, 1]


def test_requests_arriving_while_a_batch_runs_are_scored_together():
    async def behind_a_busy_session() -> list:
        batcher = DynamicBatcher(SlowPredictor(1), max_batch=4, max_wait_ms=600_000)
        batcher.start()
        images = [np.full((1, 8, 8), i, dtype=np.uint8) for i in range(4)]
        first = asyncio.ensure_future(batcher.submit(images[0]))
        await asyncio.sleep(0.01)  # the first is being scored (50 ms): the others queue behind it
        rest = await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in images[1:])), 30)
        await batcher.stop()
        return [await first, *rest]

    results = asyncio.run(behind_a_busy_session())
    assert [r.batch_size for r in results] == [1, 3, 3, 3]
    assert [int(r.probabilities[0]) for r in results] == [0, 1, 2, 3]
