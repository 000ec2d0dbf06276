"""Requests' images decoded together: one thread per device takes every request waiting for decode and
decodes their JPEGs in one call.

nvJPEG through torchvision takes a process-wide lock and synchronises its stream around every call, so
sixteen decode threads calling it queue on one decoder, each with a request's few images. Here the
request threads only submit and wait: while one call runs, the requests that arrive queue up, and the
next call takes all of them (up to max_images), the way the batcher fills forward passes. How much of a
call is in device memory at once is the decode function's to bound (torch_imaging.DECODE_CHUNK_PIXELS).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger(__name__)


class Job(Protocol):
    blobs: Sequence[bytes]


J = TypeVar("J", bound=Job)


@dataclass
class DecodeQueueStats:
    calls: int = 0
    requests: int = 0
    images: int = 0


class DecodeQueueClosed(RuntimeError):
    pass


_STOP = object()


class DecodeQueue(Generic[J]):
    def __init__(
        self,
        decode_jobs: Callable[[list[J]], Sequence[Any]],
        *,
        max_images: int = 256,
        name: str = "",
    ) -> None:
        """`decode_jobs`: jobs -> one result per job, in order (an exception object is handed to that
        job's caller as its error)."""
        if max_images < 1:
            raise ValueError("max_images must be >= 1")
        self.max_images = max_images
        self.stats = DecodeQueueStats()
        self._decode_jobs = decode_jobs
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._held: tuple[J, Future[Any]] | None = None  # taken from the queue, goes first next call
        self._thread = threading.Thread(target=self._loop, name=f"decode-{name}", daemon=True)
        self._thread.start()

    def submit(self, job: J) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise DecodeQueueClosed("the runner is closed")
            self._queue.put((job, future))
        return future

    def decode(self, job: J) -> Any:
        """Submit and wait: what a request's decode thread calls."""
        result = self.submit(job).result()
        if isinstance(result, BaseException):
            raise result
        return result

    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)

    def _take(self) -> tuple[list[tuple[J, Future[Any]]], bool]:
        """Every waiting job up to max_images (at least one), and whether the queue was told to stop."""
        taken: list[tuple[J, Future[Any]]] = []
        images = 0
        first = self._held if self._held is not None else self._queue.get()
        self._held = None
        if first is _STOP:
            return taken, True
        taken.append(first)
        images += len(first[0].blobs)
        while images < self.max_images:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return taken, True
            if images + len(item[0].blobs) > self.max_images:
                self._held = item  # first in the next call
                break
            taken.append(item)
            images += len(item[0].blobs)
        return taken, False

    def _loop(self) -> None:
        while True:
            taken, stop = self._take()  # close() puts the stop marker last: nothing is queued behind it
            self._run([(job, f) for job, f in taken if f.set_running_or_notify_cancel()])
            if stop:
                return

    def _run(self, live: list[tuple[J, Future[Any]]]) -> None:
        if not live:
            return
        try:
            results = self._decode_jobs([job for job, _ in live])
        except BaseException as exc:  # the whole call failed: each of its requests gets the error
            log.warning("decode of %d requests failed: %s", len(live), exc)
            for _, f in live:
                f.set_exception(exc)
            return
        self.stats.calls += 1
        self.stats.requests += len(live)
        self.stats.images += sum(len(job.blobs) for job, _ in live)
        for (_, f), result in zip(live, results):
            f.set_result(result)
