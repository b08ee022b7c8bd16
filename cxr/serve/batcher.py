"""Dynamic batching: concurrent requests are scored together, with a bounded wait and a bounded batch.

A batch never exceeds `max_batch`. As many batches are scored at once as the predictor has sessions
(`concurrency`), each in its own worker thread. While none is running a request is scored at once, with
whatever else is queued; while one runs, the next batch waits at most `max_wait_ms` for company. Under
load batches grow on their own; alone a request never waits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cxr.serve.predictor import Predictor


@dataclass
class Scored:
    """One image's result."""

    probabilities: np.ndarray
    embedding: np.ndarray
    batch_size: int


class DynamicBatcher:
    """Collects single images into batches for a predictor."""

    def __init__(
        self,
        predictor: Predictor,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        on_batch: Callable[[int], None] | None = None,
    ):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")
        self.predictor, self.max_batch, self.max_wait = predictor, max_batch, max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] = asyncio.Queue()
        self.concurrency = max(1, getattr(predictor, "concurrency", 1))
        self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="model")
        self._slots = asyncio.Semaphore(self.concurrency)  # bound to the running loop on first use
        self._running: set[asyncio.Task] = set()
        self._scoring = 0  # batches dispatched and not yet scored
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Finish queued work, then stop."""
        while not self._queue.empty():
            await asyncio.sleep(0.005)
        if self._running:
            await asyncio.wait(set(self._running))
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=True)

    async def submit(self, image: np.ndarray) -> Scored:
        """Score one uint8 [1, crop, crop] image; returns when its batch is done."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((image, future))
        return await future

    async def _loop(self) -> None:
        while True:
            await self._slots.acquire()  # a session is free: gather the next batch for it
            items = [await self._queue.get()]
            deadline = time.monotonic() + (self.max_wait if self._scoring else 0.0)  # idle: no waiting
            while len(items) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    while len(items) < self.max_batch and not self._queue.empty():
                        items.append(self._queue.get_nowait())
                    break
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            self._scoring += 1
            task = asyncio.get_running_loop().create_task(self._score(items))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _score(self, items: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        try:
            batch = np.stack([image for image, _ in items])
            if self.on_batch is not None:
                self.on_batch(len(items))
            loop = asyncio.get_running_loop()
            probs, embeddings = await loop.run_in_executor(self._executor, self.predictor.predict, batch)
        except Exception as error:  # the model failed: every waiter learns it, the loop lives on
            for _, future in items:
                if not future.done():
                    future.set_exception(error)
            return
        finally:
            self._scoring -= 1
            self._slots.release()
        for index, (_, future) in enumerate(items):
            if not future.done():
                future.set_result(Scored(probs[index], embeddings[index], len(items)))
