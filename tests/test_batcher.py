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
