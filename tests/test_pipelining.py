"""SlotPipeline on a fake device: a device thread of its own runs launched work in order, as a GPU stream
does, so that the launch thread really runs ahead of it. What must hold whatever the timing: results in
their own batch's future, at most K in flight, no slot reused before its work is fetched, a failing batch
fails alone, close() drains."""

from __future__ import annotations

import queue
import random
import threading
import time
from concurrent.futures import Future, wait

import numpy as np
import pytest

from saikyo.runtime.torch.pipelining import PipelineClosed, SlotPipeline


class FakeDevice:
    def __init__(self, slots: int, seconds: float = 0.002) -> None:
        self.seconds = seconds
        self.work: queue.SimpleQueue[tuple[int, threading.Event] | None] = queue.SimpleQueue()
        self.outputs: list[np.ndarray | None] = [None] * slots
        self.busy: set[int] = set()  # slots launched and not yet fetched
        self.most_busy = 0
        self.errors: list[str] = []  # broken promises, checked by the tests
        self.launch_waits = 0  # launches that found the device still busy: the launcher ran ahead
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.work.get()) is not None:
            slot, done = job
            time.sleep(self.seconds * random.uniform(0.5, 1.5))
            if self.outputs[slot] is not None and np.isnan(self.outputs[slot]).any():  # type: ignore[union-attr]
                self.outputs[slot] = None  # a device fault: the result is lost
            done.set()

    def launch(self, slot: int, batch: np.ndarray) -> threading.Event:
        if batch[0] == -1:
            raise RuntimeError("cannot launch this batch")
        with self.lock:
            if slot in self.busy:
                self.errors.append(f"slot {slot} reused before its work was fetched")
            self.busy.add(slot)
            self.most_busy = max(self.most_busy, len(self.busy))
            if not self.work.empty():
                self.launch_waits += 1
        self.outputs[slot] = np.where(batch == -2, np.nan, batch * 10.0)  # -2: fails on the device
        done = threading.Event()
        self.work.put((slot, done))
        return done

    def wait(self, slot: int, ticket: threading.Event) -> None:
        ticket.wait()

    def fetch(self, slot: int, ticket: threading.Event) -> np.ndarray:
        with self.lock:
            self.busy.discard(slot)
        out = self.outputs[slot]
        if out is None:
            raise RuntimeError("device fault in this batch")
        return out.copy()

    def device_seconds(self, slot: int, ticket: threading.Event) -> float:
        return self.seconds

    def stop(self) -> None:
        self.work.put(None)
        self.thread.join(5)


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_every_batch_gets_its_own_result_with_at_most_k_in_flight(slots: int) -> None:
    device = FakeDevice(slots)
    pipeline = SlotPipeline(device, slots, name="t")
    try:
        batches = [np.arange(i, i + 4, dtype=np.float64) for i in range(60)]
        futures = [pipeline.submit(b, len(b)) for b in batches]
        for batch, future in zip(batches, futures):
            np.testing.assert_array_equal(future.result(timeout=30), batch * 10.0)
        assert device.errors == []
        assert device.most_busy == slots  # the launcher kept every slot busy, and never more
        if slots > 1:
            assert device.launch_waits > 0  # it launched while the device still ran earlier batches
        stats = pipeline.stats
        assert (stats.batches, stats.images, stats.failed, stats.in_flight) == (60, 240, 0, 0)
        assert stats.device_seconds == pytest.approx(60 * device.seconds)
    finally:
        pipeline.close()
        device.stop()


def test_results_come_back_to_callers_on_several_threads() -> None:
    # As the batcher calls it: several executor threads, each waiting on its own batch.
    device = FakeDevice(2)
    pipeline = SlotPipeline(device, 2, name="t")
    failures: list[str] = []

    def caller(k: int) -> None:
        for i in range(20):
            batch = np.full(3, k * 100 + i, dtype=np.float64)
            got = pipeline.run(batch, 3)
            if not np.array_equal(got, batch * 10.0):
                failures.append(f"caller {k} batch {i}: {got}")

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert failures == [] and device.errors == []
        assert pipeline.stats.batches == 80
    finally:
        pipeline.close()
        device.stop()


@pytest.mark.parametrize("poison, message", [(-1, "cannot launch"), (-2, "device fault")])
def test_a_failing_batch_fails_alone(poison: float, message: str) -> None:
    device = FakeDevice(2)
    pipeline = SlotPipeline(device, 2, name="t")
    try:
        batches = [np.full(2, float(i)) for i in range(12)]
        batches[5] = np.full(2, poison)
        futures = [pipeline.submit(b, 2) for b in batches]
        wait(futures, timeout=30)
        with pytest.raises(RuntimeError, match=message):
            futures[5].result()
        for i, f in enumerate(futures):
            if i != 5:
                np.testing.assert_array_equal(f.result(), batches[i] * 10.0)
        assert device.errors == []
        assert (pipeline.stats.batches, pipeline.stats.failed, pipeline.stats.in_flight) == (11, 1, 0)
        # The slot of the failed batch serves again.
        np.testing.assert_array_equal(pipeline.run(np.ones(2), 2), np.full(2, 10.0))
    finally:
        pipeline.close()
        device.stop()


def test_close_drains_what_was_submitted_and_refuses_more() -> None:
    device = FakeDevice(2, seconds=0.01)
    pipeline = SlotPipeline(device, 2, name="t")
    futures: list[Future[np.ndarray]] = [pipeline.submit(np.full(1, float(i)), 1) for i in range(20)]
    pipeline.close()
    try:
        assert all(f.done() for f in futures)  # close returned only once they had finished
        assert [float(f.result()[0]) for f in futures] == [i * 10.0 for i in range(20)]
        with pytest.raises(PipelineClosed):
            pipeline.submit(np.ones(1), 1)
        pipeline.close()  # twice is harmless
    finally:
        device.stop()


def test_a_cancelled_batch_is_never_launched() -> None:
    device = FakeDevice(1, seconds=0.2)  # long enough for the cancels below to come first
    pipeline = SlotPipeline(device, 1, name="t")
    try:
        first = pipeline.submit(np.ones(1), 1)
        queued = [pipeline.submit(np.full(1, 2.0), 1) for _ in range(5)]
        cancelled = [f.cancel() for f in queued]
        first.result(timeout=10)
        pipeline.close()
        assert pipeline.stats.batches == 1 + cancelled.count(False)
        assert any(cancelled)
    finally:
        device.stop()


def test_slots_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SlotPipeline(FakeDevice(1), 0)
