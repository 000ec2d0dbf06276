"""DynamicBatcher unit tests: a fake runner whose output row i is the input item i's marker value."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from saikyo.inference.batching import (
    BatcherClosed,
    BatcherFailed,
    BatchFailed,
    DeadlineExceeded,
    DynamicBatcher,
    QueueFull,
)

POISON = 666.0


class FakeRunner:
    """Returns each item's marker (item[0]) as a 1-column row; can be gated and poisoned."""

    def __init__(self) -> None:
        self.batches: list[list[float]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.gate.wait(10)
        markers = batch[:, 0].copy()
        self.batches.append(markers.tolist())
        if (markers == POISON).any():
            raise RuntimeError("poisoned batch")
        return markers.reshape(-1, 1) * 2


def items(*markers: float) -> list[np.ndarray]:
    return [np.full(4, m, np.float32) for m in markers]


def make(runner: FakeRunner, **kw) -> tuple[DynamicBatcher, ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(1)
    kw.setdefault("max_batch_size", 4)
    kw.setdefault("max_queue_images", 64)
    batcher = DynamicBatcher(runner, (4,), np.float32, executor, **kw)
    batcher.start()
    return batcher, executor


async def wait_entered(runner: FakeRunner) -> None:
    while not runner.entered.is_set():
        await asyncio.sleep(0.001)


def test_results_come_back_in_request_order_across_concurrent_requests() -> None:
    async def main() -> None:
        runner = FakeRunner()
        batcher, ex = make(runner)
        requests = [items(*(100 * r + i for i in range(r % 5 + 1))) for r in range(20)]
        results = await asyncio.gather(*(batcher.submit(req) for req in requests))
        for req, res in zip(requests, results):
            assert res[:, 0].tolist() == [float(x[0]) * 2 for x in req]
        await batcher.close()
        ex.shutdown()

    asyncio.run(main())


def test_one_request_spans_batches_and_max_size_is_respected() -> None:
    async def main() -> None:
        runner = FakeRunner()
        sizes: list[int] = []
        batcher, ex = make(runner, on_batch=lambda n, s: sizes.append(n))
        res = await batcher.submit(items(*range(10)))
        assert res[:, 0].tolist() == [2.0 * i for i in range(10)]
        assert sizes == [4, 4, 2]
        # Many concurrent requests: no batch exceeds the limit.
        await asyncio.gather(*(batcher.submit(items(*range(3))) for _ in range(15)))
        assert max(sizes) <= 4
        await batcher.close()
        ex.shutdown()

    asyncio.run(main())


def test_batches_fill_while_the_runner_is_busy() -> None:
    async def main() -> None:
        runner = FakeRunner()
        runner.gate.clear()
        batcher, ex = make(runner, max_batch_size=8)
        first = asyncio.ensure_future(batcher.submit(items(1)))
        await wait_entered(runner)
        later = [asyncio.ensure_future(batcher.submit(items(10 + i))) for i in range(6)]
        await asyncio.sleep(0.01)
        runner.gate.set()
        await asyncio.gather(first, *later)
        # Idle: the first image ran alone at once; the six that arrived meanwhile ran as one batch.
        assert runner.batches == [[1.0], [10.0, 11.0, 12.0, 13.0, 14.0, 15.0]]
        await batcher.close()
        ex.shutdown()

    asyncio.run(main())


def test_full_queue_refuses_at_once_with_retry_after() -> None:
    async def main() -> None:
        runner = FakeRunner()
        runner.gate.clear()
        batcher, ex = make(runner, max_batch_size=2, max_queue_images=4)
        running = asyncio.ensure_future(batcher.submit(items(1, 2)))
        await wait_entered(runner)
        queued = asyncio.ensure_future(batcher.submit(items(3, 4, 5)))
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        with pytest.raises(QueueFull) as info:
            await batcher.submit(items(6, 7))
        # The runner is gated shut: a request that queued instead of being refused would never return.
        assert time.perf_counter() - t0 < 5
        assert info.value.retry_after >= 1
        assert batcher.queued_images == 3
        runner.gate.set()
        assert (await queued)[:, 0].tolist() == [6.0, 8.0, 10.0]
        await running
        await batcher.close()
        ex.shutdown()

    asyncio.run(main())


def test_runner_error_fails_only_the_requests_in_that_batch() -> None:
    async def main() -> None:
        runner = FakeRunner()
        runner.gate.clear()
        batcher, ex = make(runner, max_batch_size=4)
        before = asyncio.ensure_future(batcher.submit(items(1)))
        await wait_entered(runner)
        poisoned = asyncio.ensure_future(batcher.submit(items(POISON)))
        neighbour = asyncio.ensure_future(batcher.submit(items(2)))
        await asyncio.sleep(0.01)
        runner.gate.set()
        assert (await before)[0, 0] == 2.0
        with pytest.raises(BatchFailed):
            await poisoned
        with pytest.raises(BatchFailed):  # shared the poisoned batch
            await neighbour
        after = await batcher.submit(items(3))  # the batcher keeps serving
        assert after[0, 0] == 6.0
        await batcher.close()
        ex.shutdown()

    asyncio.run(main())


def test_cancelled_request_does_not_poison_a_batch() -> None:
    async def main() -> None:
        runner = FakeRunner()
        runner.gate.clear()
        batcher, ex = make(runner, max_batch_size=4)
        first = asyncio.ensure_future(batcher.submit(items(1)))
        await wait_entered(runner)
        gone = asyncio.ensure_future(batcher.submit(items(50, 51, 52)))
        kept = asyncio.ensure_future(batcher.submit(items(7, 8)))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client disconnected
        await asyncio.sleep(0)
        runner.gate.set()
        await first
        assert (await kept)[:, 0].tolist() == [14.0, 16.0]
        assert gone.cancelled()
        assert [50.0] not in runner.batches and all(50.0 not in b for b in runner.batches)
        assert batcher.queued_images == 0
        await batcher.close()
        ex.shutdown()

    asyncio.run(main())


def test_max_delay_waits_for_more_images_when_idle() -> None:
    async def main() -> None:
        runner = FakeRunner()
        batcher, ex = make(runner, max_batch_size=4, max_delay_ms=1500)
        a = asyncio.ensure_future(batcher.submit(items(1)))
        await asyncio.sleep(0.02)
        b = asyncio.ensure_future(batcher.submit(items(2)))
        await asyncio.gather(a, b)
        assert runner.batches == [[1.0, 2.0]]
        # A full batch does not wait for the delay (margin for a busy machine: well under 1.5 s).
        t0 = time.perf_counter()
        await batcher.submit(items(1, 2, 3, 4))
        assert time.perf_counter() - t0 < 1.0
        await batcher.close()
        ex.shutdown()

    asyncio.run(main())


def test_expired_deadline_is_refused_before_running() -> None:
    async def main() -> None:
        runner = FakeRunner()
        runner.gate.clear()
        batcher, ex = make(runner)
        first = asyncio.ensure_future(batcher.submit(items(1)))
        await wait_entered(runner)
        late = asyncio.ensure_future(batcher.submit(items(2), deadline=time.monotonic() + 0.01))
        await asyncio.sleep(0.05)
        runner.gate.set()
        await first
        with pytest.raises(DeadlineExceeded):
            await late
        assert runner.batches == [[1.0]]
        await batcher.close()
        ex.shutdown()

    asyncio.run(main())


def test_close_fails_queued_work_and_refuses_new() -> None:
    async def main() -> None:
        runner = FakeRunner()
        runner.gate.clear()
        batcher, ex = make(runner, max_batch_size=1)
        running = asyncio.ensure_future(batcher.submit(items(1)))
        await wait_entered(runner)
        queued = asyncio.ensure_future(batcher.submit(items(2)))
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.01)
        runner.gate.set()
        await closing
        assert (await running)[0, 0] == 2.0  # the batch in flight completes
        with pytest.raises(BatcherClosed):
            await queued
        with pytest.raises(BatcherClosed):
            await batcher.submit(items(3))
        ex.shutdown()

    asyncio.run(main())


# ---- several batches in flight (a runner that declares max_in_flight > 1, e.g. OpenVINO streams) ----
class GatedRunner:
    """Each call blocks until its batch's first marker is released, so batches finish in any order the test
    chooses; counts how many calls run at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.started: list[float] = []  # first marker of each batch, in start order
        self.release: dict[float, threading.Event] = {}
        self.all_open = False

    def gate(self, marker: float) -> threading.Event:
        with self.lock:
            event = self.release.setdefault(marker, threading.Event())
            if self.all_open:
                event.set()
            return event

    def open_all(self) -> None:
        with self.lock:
            self.all_open = True
            for event in self.release.values():
                event.set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        first = float(batch[0, 0])
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.started.append(first)
        try:
            self.gate(first).wait(10)
            if (batch[:, 0] == POISON).any():
                raise RuntimeError("poisoned batch")
            return batch[:, :1] * 2
        finally:
            with self.lock:
                self.running -= 1


def make_k(runner: GatedRunner, k: int, **kw) -> tuple[DynamicBatcher, ThreadPoolExecutor]:
    # More threads than slots: the batcher, not the executor, must be what bounds the batches at once.
    executor = ThreadPoolExecutor(k + 2)
    kw.setdefault("max_batch_size", 2)
    kw.setdefault("max_queue_images", 64)
    batcher = DynamicBatcher(runner, (4,), np.float32, executor, max_in_flight=k, **kw)
    batcher.start()
    return batcher, executor


async def wait_started(runner: GatedRunner, count: int) -> None:
    for _ in range(2000):
        if len(runner.started) >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{count} batches did not start: {runner.started}")


def test_k_in_flight_runs_at_most_k_batches_at_once_and_keeps_request_order() -> None:
    async def main() -> None:
        runner = GatedRunner()
        batcher, ex = make_k(runner, 3)
        # One request of 10 images spans five batches of 2; two more requests queue behind it.
        big = asyncio.ensure_future(batcher.submit(items(*range(10))))
        await wait_started(runner, 3)
        await asyncio.sleep(0.05)
        assert runner.started == [0.0, 2.0, 4.0] and runner.running == 3  # the 4th batch waits for a slot
        assert batcher.running_images == 6 and batcher.queued_images == 4
        later = [asyncio.ensure_future(batcher.submit(items(100 + i, 200 + i, 300 + i))) for i in range(3)]
        # Finish them newest first: each release frees one slot, and the next batch takes it.
        for marker in (4.0, 2.0, 0.0):
            runner.gate(marker).set()
            await asyncio.sleep(0.02)
        runner.open_all()
        assert (await big)[:, 0].tolist() == [2.0 * i for i in range(10)]
        for i, fut in enumerate(later):
            assert (await fut)[:, 0].tolist() == [2.0 * (100 + i), 2.0 * (200 + i), 2.0 * (300 + i)]
        assert runner.most == 3
        await batcher.close()
        ex.shutdown()

    asyncio.run(main())


def test_k_in_flight_a_failing_batch_fails_only_its_requests() -> None:
    async def main() -> None:
        runner = GatedRunner()
        batcher, ex = make_k(runner, 2, max_batch_size=1)
        poisoned = asyncio.ensure_future(batcher.submit(items(POISON)))
        fine = asyncio.ensure_future(batcher.submit(items(7)))
        await wait_started(runner, 2)  # both in flight at once
        runner.gate(POISON).set()
        with pytest.raises(BatchFailed):
            await poisoned
        assert not fine.done()  # still running: the failure did not touch it
        runner.gate(7.0).set()
        assert (await fine)[0, 0] == 14.0
        runner.gate(8.0).set()
        assert (await batcher.submit(items(8)))[0, 0] == 16.0  # and the batcher keeps serving
        await batcher.close()
        ex.shutdown()

    asyncio.run(main())


def test_k_in_flight_a_request_fails_once_when_one_of_its_batches_fails() -> None:
    async def main() -> None:
        runner = GatedRunner()
        batcher, ex = make_k(runner, 2, max_batch_size=1)
        spanning = asyncio.ensure_future(batcher.submit(items(POISON, 9)))  # two batches, in flight together
        await wait_started(runner, 2)
        runner.gate(9.0).set()
        runner.gate(POISON).set()
        with pytest.raises(BatchFailed):
            await spanning
        runner.gate(5.0).set()
        assert (await batcher.submit(items(5)))[0, 0] == 10.0
        await batcher.close()
        ex.shutdown()

    asyncio.run(main())


def test_k_in_flight_close_drains_every_batch_in_flight() -> None:
    async def main() -> None:
        runner = GatedRunner()
        batcher, ex = make_k(runner, 2, max_batch_size=1)
        running = [asyncio.ensure_future(batcher.submit(items(m))) for m in (1, 2)]
        await wait_started(runner, 2)
        queued = asyncio.ensure_future(batcher.submit(items(3)))
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.02)
        assert not closing.done()  # waits for both batches
        runner.gate(2.0).set()
        await asyncio.sleep(0.02)
        assert not closing.done()
        runner.gate(1.0).set()
        await closing
        assert [(await f)[0, 0] for f in running] == [2.0, 4.0]
        with pytest.raises(BatcherClosed):
            await queued
        assert runner.started == [1.0, 2.0]  # the queued image never ran
        ex.shutdown()

    asyncio.run(main())


# ---- liveness: a runner that hangs, a loop that dies ----
def test_a_hung_runner_fails_its_batch_and_the_queue_then_refuses_new_work() -> None:
    async def main() -> None:
        runner = FakeRunner()
        runner.gate.clear()  # the forward pass never returns (until the test lets it go)
        failures: list[str] = []
        batcher, ex = make(runner, batch_timeout_s=0.3, on_failure=failures.append)
        first = asyncio.ensure_future(batcher.submit(items(1, 2)))
        await wait_entered(runner)
        queued = asyncio.ensure_future(batcher.submit(items(3)))
        started = time.monotonic()
        for waiting in (first, queued):
            with pytest.raises(BatcherFailed, match="ran over batch_timeout_s = 0.3 s"):
                await waiting
        assert time.monotonic() - started < 5
        assert len(failures) == 1 and "runner looks hung" in failures[0] and batcher.failure == failures[0]
        with pytest.raises(BatcherFailed, match="hung"):
            await batcher.submit(items(4))
        runner.gate.set()
        await batcher.close()
        ex.shutdown(wait=True)

    asyncio.run(main())


def test_a_batching_loop_that_dies_fails_what_waits_and_says_so() -> None:
    async def main() -> None:
        runner = FakeRunner()
        runner.gate.clear()
        failures: list[str] = []
        batcher, ex = make(runner, batch_timeout_s=30, on_failure=failures.append)
        running = asyncio.ensure_future(batcher.submit(items(1)))
        await wait_entered(runner)

        def broken(_buffer: object) -> None:
            raise RuntimeError("assembler bug")

        batcher._assemble = broken  # type: ignore[method-assign]  # the next batch's assembly raises
        runner.gate.set()
        assert (await running).tolist() == [[2.0]]  # the batch in flight still answers
        with pytest.raises(BatcherFailed, match="batching loop died: RuntimeError: assembler bug"):
            await asyncio.wait_for(batcher.submit(items(2)), 5)
        assert failures and "assembler bug" in failures[0]
        with pytest.raises(BatcherFailed):
            await batcher.submit(items(3))
        await batcher.close()
        ex.shutdown(wait=True)

    asyncio.run(main())


def test_every_wait_is_bounded_even_if_nothing_fails() -> None:
    async def main() -> None:
        runner = FakeRunner()
        batcher, ex = make(runner, batch_timeout_s=0.05)
        # A batch that runs but whose rows are never handed out would leave the request waiting for ever.
        batcher._distribute = lambda parts, result: None  # type: ignore[method-assign]
        with pytest.raises(BatcherFailed, match="no answer within"):
            await asyncio.wait_for(batcher.submit(items(1)), 5)
        await batcher.close()
        ex.shutdown(wait=True)

    asyncio.run(main())
