"""A bounded queue in front of one inference worker that runs requests in batches.

Requests are *admitted* first (`admit`): at most `max_queue` may be waiting (receiving,
decoding or queued) at once, and optionally at most `max_per_key` per API key; beyond that
`QueueFull` / `KeyBusy` is raised at once, so memory never grows with the load. An admitted
request then `submit`s its prepared input and awaits the result.

The worker (one per model, hence per device) takes the first queued job, waits at most
`max_wait_s` for more, up to `max_batch_size`, drops jobs whose caller already gave up (client
gone, timeout), and runs the rest as one call of `run_batch` on its own thread, so the event
loop keeps serving while the model computes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

__all__ = ["Admission", "BatchingQueue", "KeyBusy", "QueueFull"]

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """`max_queue` requests are already waiting."""


class KeyBusy(Exception):
    """This key already has `max_per_key` requests admitted."""


class Admission:
    """One admitted request's place. `leave_queue` when its batch starts running; `release`
    when the request is answered (both idempotent)."""

    def __init__(self, queue: BatchingQueue, key: str | None) -> None:
        self._queue = queue
        self.key = key
        self._queued = True
        self._released = False

    def leave_queue(self) -> None:
        if self._queued:
            self._queued = False
            self._queue._pending -= 1
            self._queue._depth_changed()

    def release(self) -> None:
        self.leave_queue()
        if not self._released:
            self._released = True
            counts = self._queue._per_key
            counts[self.key] -= 1
            if counts[self.key] <= 0:
                del counts[self.key]


@dataclass
class _Job:
    admission: Admission
    item: Any
    future: asyncio.Future


class BatchingQueue:
    """Admission control, a job queue and the batching worker for one `run_batch` function.

    Args:
        run_batch: list of prepared inputs -> list of results, same order; called on the
            worker thread, one call at a time.
        max_batch_size: most jobs per call.
        max_wait_s: how long to wait for the batch to fill after its first job.
        max_queue: most admitted requests not yet running.
        max_per_key: most admitted-and-unanswered requests per key (0: no limit).
        on_batch: called with (batch size, seconds) after each batch.
        on_depth: called with the number of waiting requests whenever it changes.
        on_drop: called with the number of jobs dropped before inference.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Any]], list[Any]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        max_per_key: int = 0,
        on_batch: Callable[[int, float], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.max_per_key = max_per_key
        self._on_batch = on_batch
        self._on_depth = on_depth
        self._on_drop = on_drop
        self._pending = 0
        self._per_key: collections.Counter = collections.Counter()
        self._jobs: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def depth(self) -> int:
        """Requests admitted and not yet in a running batch."""
        return self._pending

    def _depth_changed(self) -> None:
        if self._on_depth is not None:
            self._on_depth(self._pending)

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Start the worker on the running event loop."""
        self._jobs = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="detrkit-inference")
        self._worker = asyncio.create_task(self._work(), name="detrkit-batching-worker")

    async def stop(self) -> None:
        """Stop the worker after its current batch; jobs still queued fail with
        RuntimeError."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while self._jobs is not None and not self._jobs.empty():
            job = self._jobs.get_nowait()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def run_on_worker(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the inference thread, between batches (e.g. a warm-up)."""
        assert self._executor is not None, "BatchingQueue.start() first"
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # ---------------------------------------------------------------- requests
    def admit(self, key: str | None = None) -> Admission:
        """A place in the queue, or QueueFull / KeyBusy at once."""
        if self._pending >= self.max_queue:
            raise QueueFull
        if self.max_per_key and self._per_key[key] >= self.max_per_key:
            raise KeyBusy
        self._pending += 1
        self._per_key[key] += 1
        self._depth_changed()
        return Admission(self, key)

    def submit(self, admission: Admission, item: Any) -> asyncio.Future:
        """Queue `item`; the future resolves to its result. Cancelling the future drops the
        job if its batch has not started."""
        assert self._jobs is not None, "BatchingQueue.start() first"
        future = asyncio.get_running_loop().create_future()
        self._jobs.put_nowait(_Job(admission, item, future))
        return future

    # ---------------------------------------------------------------- worker
    async def _next_batch(self) -> list[_Job]:
        assert self._jobs is not None
        batch = [await self._jobs.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._jobs.empty():
                batch.append(self._jobs.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._jobs.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            live = [job for job in batch if not job.future.done()]
            dropped = len(batch) - len(live)
            if dropped and self._on_drop is not None:
                self._on_drop(dropped)
            for job in batch:
                job.admission.leave_queue()
            if not live:
                continue
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(
                    self._executor, self.run_batch, [job.item for job in live]
                )
                if len(results) != len(live):
                    raise RuntimeError(
                        f"run_batch returned {len(results)} results for {len(live)} inputs"
                    )
            except asyncio.CancelledError:
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(RuntimeError("the server is shutting down"))
                raise
            except Exception as e:
                logger.exception("inference failed on a batch of %d", len(live))
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            if self._on_batch is not None:
                self._on_batch(len(live), time.perf_counter() - start)
            for job, result in zip(live, results):
                if not job.future.done():
                    job.future.set_result(result)
