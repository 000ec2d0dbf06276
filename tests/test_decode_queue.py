"""DecodeQueue: the JPEGs of requests waiting for decode go in one call; each request gets its own
results. First with a fake decode function (exact counts), then through the torch runner on
torchvision's CPU decoder, against decoding each request alone."""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from support.paths import DATA
from PIL import Image

from saikyo.inference import imaging
from saikyo.models import zoo
from saikyo.runtime.torch import imaging as torch_imaging
from saikyo.runtime.torch.decode_queue import DecodeQueue, DecodeQueueClosed

PHOTOS = [(DATA / name).read_bytes() for name in ("cat.jpg", "coffee.jpg", "astronaut.jpg")]


@dataclass
class FakeJob:
    blobs: Sequence[bytes]


class FakeDecoder:
    """Records each call's jobs; the first call blocks until released, so that the rest queue up."""

    def __init__(self) -> None:
        self.calls: list[list[FakeJob]] = []
        self.entered = threading.Event()  # the first call has begun
        self.release = threading.Event()

    def __call__(self, jobs: list[FakeJob]) -> list[object]:
        if not self.calls:
            self.entered.set()
            self.release.wait(10)
        self.calls.append(jobs)
        if any(b"boom" in job.blobs for job in jobs):
            raise RuntimeError("decoder crashed")
        return [ValueError("bad request") if b"bad" in job.blobs else [b.upper() for b in job.blobs] for job in jobs]


def test_requests_that_wait_share_one_call_and_get_their_own_results() -> None:
    fake = FakeDecoder()
    q: DecodeQueue[FakeJob] = DecodeQueue(fake, max_images=6, name="t")
    try:
        first = q.submit(FakeJob([b"a"]))
        assert fake.entered.wait(10)  # the first call is running (blocked): the next ones queue behind it
        jobs = [FakeJob([f"r{i}x{k}".encode() for k in range(2)]) for i in range(5)]
        futures = [q.submit(job) for job in jobs]
        fake.release.set()
        assert first.result(10) == [b"A"]
        for job, future in zip(jobs, futures):
            assert future.result(10) == [b.upper() for b in job.blobs]
        # 1 alone, then 10 images in calls of at most 6: 3 requests (6 images), then 2 (4 images).
        assert [len(c) for c in fake.calls] == [1, 3, 2]
        assert (q.stats.calls, q.stats.requests, q.stats.images) == (3, 6, 11)
    finally:
        q.close()


def test_a_request_larger_than_a_call_still_goes_alone() -> None:
    fake = FakeDecoder()
    fake.release.set()
    q: DecodeQueue[FakeJob] = DecodeQueue(fake, max_images=2, name="t")
    try:
        assert q.decode(FakeJob([b"a", b"b", b"c"])) == [b"A", b"B", b"C"]
    finally:
        q.close()


def test_one_requests_error_and_a_failed_call_stay_with_their_requests() -> None:
    fake = FakeDecoder()
    q: DecodeQueue[FakeJob] = DecodeQueue(fake, max_images=100, name="t")
    try:
        blocker = q.submit(FakeJob([b"a"]))
        assert fake.entered.wait(10)
        good, bad = q.submit(FakeJob([b"ok"])), q.submit(FakeJob([b"bad"]))
        fake.release.set()
        blocker.result(10)
        assert good.result(10) == [b"OK"]
        assert isinstance(bad.result(10), ValueError)  # a result that is an error: decode() raises it
        with pytest.raises(ValueError, match="bad request"):
            q.decode(FakeJob([b"bad"]))
        with pytest.raises(RuntimeError, match="decoder crashed"):
            q.decode(FakeJob([b"boom"]))
        assert q.decode(FakeJob([b"after"])) == [b"AFTER"]  # the thread lives on
    finally:
        q.close()


def test_close_finishes_what_was_submitted_then_refuses() -> None:
    fake = FakeDecoder()
    q: DecodeQueue[FakeJob] = DecodeQueue(fake, max_images=4, name="t")
    futures = [q.submit(FakeJob([f"{i}".encode()])) for i in range(9)]
    fake.release.set()
    q.close()
    assert [f.result(0) for f in futures] == [[f"{i}".encode()] for i in range(9)]
    with pytest.raises(DecodeQueueClosed):
        q.submit(FakeJob([b"late"]))


# ---- through the torch runner, torchvision's CPU decoder standing in for nvJPEG ----
@pytest.fixture(scope="module")
def runner():  # type: ignore[no-untyped-def]
    from saikyo.models import builders
    from saikyo.runtime.torch.runner import TorchRunner

    spec = zoo.get("squeezenet1_1")
    r = TorchRunner(
        "sq", builders.build(spec, "random"), spec.preprocessing, {"num_classes": 1000, "weights": "random"},
        device="cpu", max_batch_size=4, device_decode="on",
    )  # fmt: skip
    yield r
    r.close()


def png(data: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, "PNG")
    return buf.getvalue()


def test_gathered_decode_equals_decoding_each_request_alone(runner) -> None:  # type: ignore[no-untyped-def]
    pp = runner.preprocessing
    requests = [[PHOTOS[i % 3], PHOTOS[(i + 1) % 3]] for i in range(12)]
    requests[4] = [PHOTOS[0], png(PHOTOS[1])]  # a PNG goes to the CPU path, beside its JPEG
    requests[7] = [PHOTOS[2][:3000] + torch_imaging.JPEG_END]  # nvJPEG refuses it; the CPU path says why
    before = runner._decode_queue.stats.calls
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(runner.decode_images, requests))
    calls = runner._decode_queue.stats.calls - before
    assert calls < len(requests)  # requests were gathered into shared calls
    for blobs, images in zip(requests, got):
        alone = torch_imaging.decode(blobs, pp, "cpu")
        assert len(images) == len(alone)
        for a, b in zip(images, alone):
            if isinstance(b, imaging.ImageError):
                assert isinstance(a, imaging.ImageError) and str(a) == str(b)
            else:
                assert isinstance(a, torch.Tensor) and torch.equal(a, b)
    # And the same pixels as the Pillow path, within the JPEG decoders' rounding.
    cat = got[0][0].numpy().astype(np.int16)
    assert np.abs(cat - imaging.decode(PHOTOS[0], pp).astype(np.int16)).mean() < 1.0


def test_a_request_over_its_pixel_budget_fails_alone(runner) -> None:  # type: ignore[no-untyped-def]
    small = imaging.RequestBudget(max_pixels=1000)
    ample = imaging.RequestBudget(max_pixels=10**9)
    with ThreadPoolExecutor(2) as pool:
        over = pool.submit(runner.decode_images, PHOTOS, None, small)
        fine = pool.submit(runner.decode_images, PHOTOS, None, ample)
        with pytest.raises(imaging.BudgetExceeded):
            over.result(60)
        assert all(isinstance(t, torch.Tensor) for t in fine.result(60))
