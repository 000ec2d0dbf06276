"""Several batches in flight on one device: a thread that launches and never waits for the device, and a
thread that waits and hands results back.

    submit(batch) --> launch thread: take a free slot (K in all), stage the batch into the slot's input,
                      launch the forward pass and the copy back on the slot's stream, record an event;
                      then on to the next batch, while the device still runs this one
                  --> completion thread: in launch order, wait for each batch's event, copy its result
                      into an array of the caller's own, free the slot, resolve the batch's future
                      (one hand-off per batch)

The shape of NVIDIA's MLPerf server harness (issue thread, completion thread, a stream per batch in
flight). A slot is reused only after its batch's event fired and its result was copied out; a batch that
fails at launch or at completion fails its own future only; close() drains what was submitted.

What a device does with a slot is a `SlotDevice`: the torch runner provides the CUDA one (and a
synchronous one on the CPU), the tests a fake with a device thread of its own.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

log = logging.getLogger(__name__)

T = TypeVar("T")  # what a launch returns for its completion: events, the output tensor...


class SlotDevice(Protocol[T]):
    def launch(self, slot: int, batch: Any) -> T:
        """Stage `batch` into `slot` and start its work; must not wait for the device. A launch that
        raises leaves the slot with no work pending (the slot is handed out again)."""
        ...

    def wait(self, slot: int, ticket: T) -> None:
        """Block until the slot's work has finished (in a call that releases the GIL)."""
        ...

    def fetch(self, slot: int, ticket: T) -> np.ndarray:
        """The finished result, copied out of the slot into an array of the caller's own."""
        ...

    def device_seconds(self, slot: int, ticket: T) -> float | None:
        """How long the device worked on the batch (e.g. CUDA events), once finished; None if unknown."""
        ...


@dataclass
class PipelineStats:
    """Running totals, read at scrape time: per-batch device vs host time tells which one is the limit."""

    batches: int = 0
    failed: int = 0
    images: int = 0
    # Device time of each batch (staging copy + forward pass + copy back), summed.
    device_seconds: float = 0.0
    # Host time of each batch: staging and launching it, then copying its result out, summed.
    host_seconds: float = 0.0
    in_flight: int = 0  # batches launched and not yet completed, now


class PipelineClosed(RuntimeError):
    pass


_STOP = object()


class SlotPipeline(Generic[T]):
    def __init__(self, device: SlotDevice[T], slots: int, name: str = "", drain_timeout_s: float = 60.0) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.slots = slots
        self.stats = PipelineStats()
        self._device = device
        self._drain_timeout_s = drain_timeout_s
        self._submitted: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._launched: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(slots):
            self._free.put(slot)
        self._stats_lock = threading.Lock()
        self._closed = False
        self._close_lock = threading.Lock()
        self._launcher = threading.Thread(target=self._launch_loop, name=f"launch-{name}", daemon=True)
        self._completer = threading.Thread(target=self._complete_loop, name=f"complete-{name}", daemon=True)
        self._launcher.start()
        self._completer.start()

    def submit(self, batch: Any, n: int) -> Future[np.ndarray]:
        """Queue one batch of n items; its future holds the result (or the error of this batch only)."""
        future: Future[np.ndarray] = Future()
        with self._close_lock:
            if self._closed:
                raise PipelineClosed("the runner is closed")
            self._submitted.put((batch, n, future))
        return future

    def run(self, batch: Any, n: int) -> np.ndarray:
        return self.submit(batch, n).result()

    def close(self) -> None:
        """Stop taking batches; those already submitted finish (bounded by drain_timeout_s)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._submitted.put(_STOP)
        deadline = time.monotonic() + self._drain_timeout_s
        for thread in (self._launcher, self._completer):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("%s did not drain within %.0f s", thread.name, self._drain_timeout_s)

    # ---- the two threads ----
    def _launch_loop(self) -> None:
        while (job := self._submitted.get()) is not _STOP:
            batch, n, future = job
            if not future.set_running_or_notify_cancel():
                continue
            slot = self._free.get()  # at most `slots` batches in flight: waits for a completion, not the device
            started = time.perf_counter()
            try:
                ticket = self._device.launch(slot, batch)
            except BaseException as exc:  # this batch's failure only
                self._free.put(slot)
                with self._stats_lock:
                    self.stats.failed += 1
                future.set_exception(exc)
                continue
            host = time.perf_counter() - started
            with self._stats_lock:
                self.stats.in_flight += 1
            self._launched.put((slot, ticket, n, future, host))
        self._launched.put(_STOP)

    def _complete_loop(self) -> None:
        while (item := self._launched.get()) is not _STOP:
            slot, ticket, n, future, host = item
            result: np.ndarray | None = None
            error: BaseException | None = None
            device: float | None = None
            try:
                self._device.wait(slot, ticket)
                started = time.perf_counter()
                result = self._device.fetch(slot, ticket)
                host += time.perf_counter() - started
                device = self._device.device_seconds(slot, ticket)
            except BaseException as exc:
                error = exc
            finally:
                self._free.put(slot)  # its work is done and its result copied out (or abandoned)
            with self._stats_lock:
                s = self.stats
                s.in_flight -= 1
                if error is not None:
                    s.failed += 1
                else:
                    s.batches += 1
                    s.images += n
                    s.host_seconds += host
                    s.device_seconds += device or 0.0
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]
