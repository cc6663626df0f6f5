"""Dynamic batching on asyncio: callers submit items and await futures; no torch here.

A batch is handed to `process` when it holds `max_batch_size` items or when its oldest item has
waited `max_wait_s`, whichever comes first. `process` returns one result per item, in order.
The queue is bounded: a submit that does not fit raises `QueueFull` (the caller answers 503).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from app.errors import NotReady, Overloaded, PayloadTooLarge

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("app")


class QueueFull(Overloaded):
    """The bounded queue has no room for the submitted items (HTTP 503 + Retry-After)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": "1"})


class BatcherClosed(NotReady):
    """The batcher stopped before the item ran."""


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future[Any]
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher(Generic[T, R]):
    """Collects submitted items into batches and runs them one batch at a time.

    Args:
        process: Runs one batch; returns one result per item, in order.
        max_batch_size: Most items per batch.
        max_wait_s: Longest the first item of a batch waits for more.
        max_queue: Most items waiting (not counting the batch being processed).
        on_batch: Called with the batch size and each item's queue wait, for metrics.
        on_depth: Called with the queue depth whenever it changes, for metrics.
    """

    def __init__(
        self,
        process: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int, list[float]], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        self._process = process
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._on_batch = on_batch or (lambda size, waits: None)
        self._on_depth = on_depth or (lambda depth: None)
        self._queue: collections.deque[_Pending[T]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def depth(self) -> int:
        """Items waiting for a batch."""
        return len(self._queue)

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def close(self) -> None:
        """Stop the loop and fail every item still waiting."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(BatcherClosed("service is shutting down"))
        self._on_depth(0)

    def check_room(self, count: int) -> None:
        """Refuse now what `submit_many` would refuse, before a caller spends work on the items.

        Args:
            count: Items about to be submitted.
        """
        if self._closed:
            raise BatcherClosed("service is shutting down")
        if count > self.max_queue:  # no retry can help: say so instead of 503
            raise PayloadTooLarge(f"{count} images in one request can never fit: the queue holds at most "
                                  f"{self.max_queue} (RLRR_QUEUE_SIZE); send at most {self.max_queue} per request")
        if self.depth + count > self.max_queue:
            raise QueueFull(f"queue full ({self.depth}/{self.max_queue} images waiting)")

    def submit_many(self, items: Sequence[T]) -> list[asyncio.Future[R]]:
        """Queue items all-or-nothing; returns one future per item.

        Args:
            items: The items, e.g. the images of one request.
        """
        self.check_room(len(items))
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[R]] = []
        for item in items:
            future: asyncio.Future[R] = loop.create_future()
            self._queue.append(_Pending(item, future))
            futures.append(future)
        self._on_depth(len(self._queue))
        self._wakeup.set()
        return futures

    async def submit(self, item: T) -> R:
        """Queue one item and wait for its result.

        Args:
            item: The item.
        """
        return await self.submit_many([item])[0]

    async def _next_batch(self) -> list[_Pending[T]]:
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        # The oldest item sets the deadline; later arrivals only fill the remaining room.
        deadline = self._queue[0].enqueued + self.max_wait_s
        while len(self._queue) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        size = min(self.max_batch_size, len(self._queue))
        batch = [self._queue.popleft() for _ in range(size)]
        self._on_depth(len(self._queue))
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            # Items whose caller went away (client disconnect) are not worth computing.
            batch = [p for p in batch if not p.future.done()]
            if not batch:
                continue
            now = time.perf_counter()
            self._on_batch(len(batch), [now - p.enqueued for p in batch])
            try:
                results = await self._process([p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"process returned {len(results)} results for {len(batch)} items")
            except asyncio.CancelledError:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(BatcherClosed("service is shutting down"))
                raise
            except Exception as exc:  # one bad batch must not stop the loop
                log.exception("batch of %d failed", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, result in zip(batch, results, strict=True):
                if p.future.done():
                    continue
                if isinstance(result, Exception):  # that item alone failed (the others of the batch did not)
                    p.future.set_exception(result)
                else:
                    p.future.set_result(result)
