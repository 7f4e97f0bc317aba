"""Hook calls that arrive together, scored together: opportunistic micro-batching on the event loop.

A hook call reads its body, verifies its token and builds its chart on its own, then hands what it prepared
to a :class:`MicroBatcher` and awaits its answer. The batcher answers, at once, every call queued when it
runs (up to ``max_batch``): the calls whose requests arrived while the previous batch was worked on. It never
waits for more: a call alone is answered as soon as the event loop gets to the batcher (after the other calls
already under way have been read up to their charts, which it lets happen by yielding to the loop, no timer).
One batch costs one polars aggregation, one LightGBM pass and one write of the records for all its calls,
where one call at a time paid each per call.
"""

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger("clinical_ml.serve")

T = TypeVar("T")
R = TypeVar("R")

# Calls scored at once at most: beyond, a batch's first call would wait for too many others.
MAX_BATCH = 32
# Times the batcher yields to the event loop while the queue still grows before it works (no timer: each
# yield lets the requests already read reach the queue; at low load the first yield finds nothing new).
MAX_YIELDS = 4
# A log line (counts only) each time so many more calls were answered, to see how large batches are under load.
LOG_EVERY_CALLS = 50


class MicroBatcher(Generic[T, R]):
    """Answers items with ``work`` (a list of items -> their answers, in order), many at a time.

    ``failed`` turns an error of ``work`` into the answer of each item of that batch, where ``work`` itself
    does not keep one item's error to that item (it should). Made for one event loop (the one it is first
    used on).
    """

    def __init__(
        self,
        work: Callable[[Sequence[T]], list[R]],
        *,
        failed: Callable[[BaseException], R],
        max_batch: int = MAX_BATCH,
        max_yields: int = MAX_YIELDS,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._work = work
        self._failed = failed
        self.max_batch = max_batch
        self.max_yields = max_yields
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._runner: asyncio.Task[None] | None = None
        self.batches = 0
        self.calls = 0
        self.largest = 0

    async def submit(self, item: T) -> R:
        """The answer to ``item``, scored with whatever else is queued when the batcher runs."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, future))
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run())
        return await future

    async def _run(self) -> None:
        while self._queue:
            seen, yields = -1, 0
            while len(self._queue) != seen and len(self._queue) < self.max_batch and yields < self.max_yields:
                seen = len(self._queue)
                await asyncio.sleep(0)
                yields += 1
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            items = [item for item, _ in batch]
            try:
                answers = self._work(items)
                if len(answers) != len(items):
                    raise RuntimeError("a batch was answered with the wrong number of answers")
            except Exception as exc:
                answers = [self._failed(exc)] * len(items)
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():  # a call whose client went away was cancelled
                    future.set_result(answer)
            self._count(len(items))
            await asyncio.sleep(0)  # the answered calls go out before the next batch is worked on

    def _count(self, size: int) -> None:
        self.batches += 1
        before, self.calls = self.calls, self.calls + size
        self.largest = max(self.largest, size)
        if before // LOG_EVERY_CALLS != self.calls // LOG_EVERY_CALLS:
            log.info(
                "hook batches of process %d: %d calls in %d batches (largest %d)",
                os.getpid(),
                self.calls,
                self.batches,
                self.largest,
            )
