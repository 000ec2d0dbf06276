"""DynamicBatcher: images from many requests share one forward pass.

One batcher per model and input kind, all in the event loop. The design goal is both ends at once:
- idle: the first image runs at once (max_delay_ms = 0 by default), so no latency is added;
- loaded: while one batch runs in the model's executor thread, arriving images queue up, and the next
  batch takes up to max_batch_size of them the moment the runner is free -- batches fill by themselves.
A runner that runs several forward passes at once (OpenVINO streams) declares how many: the batcher then
keeps up to max_in_flight batches running, each from its own buffer, on as many executor threads.
A request's N images may span several batches; its result rows come back in request order.
A full queue refuses at once (QueueFull -> 503 + Retry-After) instead of growing without bound.

Items are numpy arrays of one shape, copied into a preallocated batch buffer (one per batch in flight); or,
with item_shape=None, opaque objects (e.g. images already decoded into GPU memory) that `infer` receives
as a list.
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


class BatcherFailed(Exception):
    """The batcher cannot serve any more: its loop died, or its runner hung. The message says which."""


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


_Part = tuple[_Pending, int, int, int]  # (request, its first item in the batch, count, offset in the batch)


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
        max_in_flight: int = 1,
        batch_timeout_s: float | None = None,
        name: str = "",
        on_batch: BatchObserver | None = None,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_queue_images < max_batch_size:
            raise ValueError("max_queue_images must be >= max_batch_size")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self._infer = infer
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1000.0
        self.max_queue_images = max_queue_images
        self.max_in_flight = max_in_flight
        self.name = name
        self._on_batch = on_batch
        # A forward pass running longer than this means the runner hangs (a thread cannot be stopped, so
        # the batcher gives up on it): its requests and every queued one fail, and on_failure is told.
        self.batch_timeout_s = batch_timeout_s
        self._on_failure = on_failure
        self.failure: str | None = None
        # One buffer per batch in flight, back in the free list once the runner returned from it.
        # item_shape=None: no buffers, each batch is a list of the items themselves.
        self._free: list[np.ndarray | None] = [
            None if item_shape is None else np.empty((max_batch_size, *item_shape), dtype=item_dtype)
            for _ in range(max_in_flight)
        ]
        self._item_shape = None if item_shape is None else tuple(item_shape)
        self._queue: collections.deque[_Pending] = collections.deque()
        self._pending_images = 0
        self._wakeup = asyncio.Event()  # set by submit, by a finished batch and by close
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()  # in flight
        self._closed = False
        self._running = 0  # images in the batches now in the runner
        # Smoothed images/s of one forward pass at a time, for Retry-After.
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
            self._task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            self._fail(f"its batching loop died: {type(exc).__name__}: {exc}")

    def _fail(self, reason: str) -> None:
        """From now on every request gets BatcherFailed: queued ones at once, new ones on submit."""
        if self.failure is not None:
            return
        self.failure = reason
        log.error("batcher %s: %s; failing its %d queued images", self.name, reason, self._pending_images)
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(BatcherFailed(reason))
        self._pending_images = 0
        self._wakeup.set()
        if self._on_failure is not None:
            self._on_failure(reason)

    async def close(self) -> None:
        """Stop taking work; fail what is still queued. Awaits the batches in flight."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await self._task
            except Exception:  # a loop that died was reported by _loop_ended
                pass
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
        if self.failure is not None:
            raise BatcherFailed(self.failure)
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
        ahead = self._pending_images + self._running
        self._queue.append(_Pending(items=items, future=future, deadline=deadline))
        self._pending_images += n
        self._wakeup.set()
        if self.batch_timeout_s is None:
            return await future
        # Every wait has an end: the batches ahead of this request and its own, each within the timeout.
        # (Plus a second, so that a hung batch is reported as such before a wait behind it runs out.)
        bound = 1 + self.batch_timeout_s * (2 + math.ceil((ahead + n) / (self.max_batch_size * self.max_in_flight)))
        try:
            return await asyncio.wait_for(future, bound)
        except TimeoutError:
            raise BatcherFailed(f"no answer within {bound:.0f} s") from None

    def _retry_after(self, n: int) -> int:
        if self._rate <= 0:
            return 1
        # A full queue means every slot is busy: the runner drains max_in_flight batches at once.
        return max(1, min(60, math.ceil((self._pending_images + n) / (self._rate * self.max_in_flight))))

    # ---- the loop ----
    async def _run(self) -> None:
        while not self._closed and self.failure is None:
            if not self._pending_images or not self._free:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.max_delay > 0 and self._pending_images < self.max_batch_size:
                await self._wait_for_more()
                if self._closed:
                    break
            buffer = self._free.pop()
            parts, n, batch = self._assemble(buffer)
            if n == 0:
                self._free.append(buffer)
                continue
            task = asyncio.get_running_loop().create_task(self._execute(parts, n, batch, buffer))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)
        if self._batches:
            await asyncio.wait(list(self._batches))

    async def _execute(self, parts: list[_Part], n: int, batch: Any, buffer: np.ndarray | None) -> None:
        """Run one assembled batch in the executor and hand each request its rows."""
        self._running += n
        started = time.perf_counter()
        hung = False
        try:
            running = asyncio.get_running_loop().run_in_executor(self._executor, self._infer, batch)
            # shield: on a timeout the thread runs on regardless; only the wait for it ends.
            result = await asyncio.wait_for(asyncio.shield(running), self.batch_timeout_s)
        except TimeoutError:
            hung = True  # its buffer stays the hung runner's: never handed out again
            reason = f"a forward pass of {n} images ran over batch_timeout_s = {self.batch_timeout_s:g} s"
            for p, *_ in parts:
                if not p.future.done():
                    p.future.set_exception(BatcherFailed(reason))
            self._fail(reason + ": the runner looks hung")
            return
        except Exception as exc:  # the runner's failure is this batch's failure only
            log.warning("batcher %s: batch of %d failed: %s", self.name, n, exc)
            for p, *_ in parts:
                if not p.future.done():
                    p.future.set_exception(BatchFailed(str(exc)))
            return
        finally:
            self._running -= n
            if not hung:
                self._free.append(buffer)  # the runner is done reading it
            self._wakeup.set()
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

    def _assemble(self, buffer: np.ndarray | None) -> tuple[list[_Part], int, Any]:
        """Take up to max_batch_size queued items into `buffer` (or a list). Returns (parts, count, batch)."""
        parts: list[_Part] = []
        n = 0
        now = time.monotonic()
        items: list[Any] = []
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
            if buffer is None:
                items.extend(p.items[p.taken : p.taken + take])
            else:
                for i in range(take):
                    np.copyto(buffer[n + i], p.items[p.taken + i])
            parts.append((p, p.taken, take, n))
            p.taken += take
            n += take
            self._pending_images -= take
            if p.untaken == 0:
                self._queue.popleft()
        return parts, n, (items if buffer is None else buffer[:n])

    @staticmethod
    def _distribute(parts: list[_Part], result: np.ndarray) -> None:
        for p, first, count, offset in parts:
            if p.future.done():
                continue
            if p.out is None:
                p.out = np.empty((len(p.items), *result.shape[1:]), dtype=result.dtype)
            p.out[first : first + count] = result[offset : offset + count]
            p.done += count
            if p.done == len(p.items):
                p.future.set_result(p.out)
