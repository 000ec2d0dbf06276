"""DynamicBatcher: images from many requests share one forward pass.

One batcher per model and input kind, all in the event loop. The design goal is both ends at once:
- idle: the first image runs at once (max_delay_ms = 0 by default), so no latency is added;
- loaded: while one batch runs in the model's executor thread, arriving images queue up, and the next
  batch takes up to max_batch_size of them the moment the runner is free -- batches fill by themselves.
A request's N images may span several batches; its result rows come back in request order.
A full queue refuses at once (QueueFull -> 503 + Retry-After) instead of growing without bound.

Items are numpy arrays of one shape, copied into a preallocated batch buffer; or, with item_shape=None,
opaque objects (e.g. images already decoded into GPU memory) that `infer` receives as a list.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

BatchObserver = Callable[[int, float], None]  # (batch size, seconds in the runner)


class QueueFull(Exception):
    def __init__(self, pending: int, limit: int, retry_after: int) -> None:
        super().__init__(f"queue full: {pending} images pending, limit {limit}")
        self.pending = pending
        self.limit = limit
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    """The request's deadline passed before any of its images started running."""


class BatchFailed(Exception):
    """The runner raised while running a batch that held some of this request's images."""


class BatcherClosed(Exception):
    pass


@dataclass(eq=False)
class _Pending:
    items: Sequence[Any]
    future: asyncio.Future[np.ndarray]
    deadline: float | None  # time.monotonic() seconds
    taken: int = 0  # items already placed in a batch
    done: int = 0  # items whose results arrived
    out: np.ndarray | None = None
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def untaken(self) -> int:
        return len(self.items) - self.taken


class DynamicBatcher:
    def __init__(
        self,
        infer: Callable[[Any], np.ndarray],
        item_shape: tuple[int, ...] | None,
        item_dtype: np.dtype | type | None,
        executor: Executor,
        *,
        max_batch_size: int = 16,
        max_delay_ms: float = 0.0,
        max_queue_images: int = 256,
        name: str = "",
        on_batch: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_queue_images < max_batch_size:
            raise ValueError("max_queue_images must be >= max_batch_size")
        self._infer = infer
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1000.0
        self.max_queue_images = max_queue_images
        self.name = name
        self._on_batch = on_batch
        # One buffer suffices: a batch is assembled only after the previous one returned.
        # item_shape=None: no buffer, the batch is a list of the items themselves.
        self._buffer = None if item_shape is None else np.empty((max_batch_size, *item_shape), dtype=item_dtype)
        self._item_shape = None if item_shape is None else tuple(item_shape)
        self._items: list[Any] = []
        self._queue: collections.deque[_Pending] = collections.deque()
        self._pending_images = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._running = 0  # images in the batch now in the runner
        # Smoothed images/s of the runner, for Retry-After.
        self._rate = 0.0

    # ---- state, for metrics and health ----
    @property
    def queued_images(self) -> int:
        return self._pending_images

    @property
    def running_images(self) -> int:
        return self._running

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        """Stop taking work; fail what is still queued. Awaits the batch in flight."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(BatcherClosed("server is shutting down"))
        self._pending_images = 0

    async def submit(self, items: Sequence[Any], deadline: float | None = None) -> np.ndarray:
        """Queue `items` (each of item_shape) and wait for their result rows, in order."""
        if self._closed:
            raise BatcherClosed("server is shutting down")
        n = len(items)
        if n == 0:
            raise ValueError("no items")
        if self._item_shape is not None:
            for item in items:
                if item.shape != self._item_shape:
                    raise ValueError(f"item shape {item.shape} != {self._item_shape}")
        if self._pending_images + n > self.max_queue_images:
            raise QueueFull(self._pending_images, self.max_queue_images, self._retry_after(n))
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(items=items, future=future, deadline=deadline))
        self._pending_images += n
        self._wakeup.set()
        return await future

    def _retry_after(self, n: int) -> int:
        if self._rate <= 0:
            return 1
        return max(1, min(60, math.ceil((self._pending_images + n) / self._rate)))

    # ---- the loop ----
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            if not self._pending_images:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.max_delay > 0 and self._pending_images < self.max_batch_size:
                await self._wait_for_more()
                if self._closed:
                    break
            parts, n = self._assemble()
            if n == 0:
                continue
            self._running = n
            started = time.perf_counter()
            batch = self._buffer[:n] if self._buffer is not None else self._items
            try:
                result = await loop.run_in_executor(self._executor, self._infer, batch)
            except Exception as exc:  # the runner's failure is this batch's failure only
                log.warning("batcher %s: batch of %d failed: %s", self.name, n, exc)
                for p, *_ in parts:
                    if not p.future.done():
                        p.future.set_exception(BatchFailed(str(exc)))
                continue
            finally:
                self._running = 0
                self._items = []  # drop references: list items may hold device memory
            seconds = time.perf_counter() - started
            self._rate = n / seconds if self._rate == 0 else 0.8 * self._rate + 0.2 * n / seconds
            log.debug("batcher %s: ran batch of %d in %.1f ms", self.name, n, seconds * 1000)
            if self._on_batch is not None:
                self._on_batch(n, seconds)
            self._distribute(parts, result)

    async def _wait_for_more(self) -> None:
        deadline = self._queue[0].enqueued + self.max_delay if self._queue else time.monotonic()
        while self._pending_images < self.max_batch_size and not self._closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _assemble(self) -> tuple[list[tuple[_Pending, int, int, int]], int]:
        """Copy up to max_batch_size queued items into the buffer. Returns (parts, count)."""
        parts: list[tuple[_Pending, int, int, int]] = []  # (request, first item, count, batch offset)
        n = 0
        now = time.monotonic()
        self._items = []
        while self._queue and n < self.max_batch_size:
            p = self._queue[0]
            if p.future.done():  # cancelled (client went away) or already failed
                self._pending_images -= p.untaken
                self._queue.popleft()
                continue
            if p.taken == 0 and p.deadline is not None and now > p.deadline:
                self._pending_images -= p.untaken
                self._queue.popleft()
                p.future.set_exception(DeadlineExceeded("deadline passed before inference started"))
                continue
            take = min(p.untaken, self.max_batch_size - n)
            if self._buffer is None:
                self._items.extend(p.items[p.taken : p.taken + take])
            else:
                for i in range(take):
                    np.copyto(self._buffer[n + i], p.items[p.taken + i])
            parts.append((p, p.taken, take, n))
            p.taken += take
            n += take
            self._pending_images -= take
            if p.untaken == 0:
                self._queue.popleft()
        return parts, n

    @staticmethod
    def _distribute(parts: list[tuple[_Pending, int, int, int]], result: np.ndarray) -> None:
        for p, first, count, offset in parts:
            if p.future.done():
                continue
            if p.out is None:
                p.out = np.empty((len(p.items), *result.shape[1:]), dtype=result.dtype)
            p.out[first : first + count] = result[offset : offset + count]
            p.done += count
            if p.done == len(p.items):
                p.future.set_result(p.out)
