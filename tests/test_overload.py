"""Overload on loopback: far more than capacity for a bounded time. Every request gets an answer (200, or
503 with Retry-After, or 504 past its deadline), none is lost, memory stays bounded, and the server is
alive and ready afterwards."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator

import httpx
import pytest
from support.serverproc import ServerProcess, running_server
from support.stress import encode, flood, noise_image, peak_rss_mib, rss_mib


QUEUE_IMAGES = 32
MAX_IN_FLIGHT = 24
CLIENTS = 64  # well over both bounds
IMAGES_PER_REQUEST = 4
# Peak resident memory may grow by at most this much over the idle server during the flood. The bound
# that holds it: MAX_IN_FLIGHT requests x a few kB of body, QUEUE_IMAGES decoded images, 64 connections.
PEAK_GROWTH_MIB = 300

PNG = encode(noise_image(64, 48, seed=5), "PNG")
FILES = [("images", (f"n{i}.png", PNG, "image/png")) for i in range(IMAGES_PER_REQUEST)]


@pytest.fixture(scope="module")
def overload_server(slow_repository, tmp_path_factory) -> Iterator[ServerProcess]:
    with running_server(
        slow_repository.root, "slow", tmp_path_factory.mktemp("logs"),
        "--max-batch-size", "8", "--max-queue-images", str(QUEUE_IMAGES),
        "--max-concurrent-requests", str(MAX_IN_FLIGHT),
    ) as server:  # fmt: skip
        yield server


def assert_alive_and_ready(server: ServerProcess) -> None:
    assert server.proc.poll() is None, server.log()
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200
    r = httpx.post(f"{server.url}/classify", files=FILES, timeout=30)
    assert r.status_code == 200 and len(r.json()) == IMAGES_PER_REQUEST


def test_flood_every_request_answered_200_or_503_none_lost(overload_server) -> None:
    pid = overload_server.proc.pid
    assert_alive_and_ready(overload_server)
    idle = rss_mib(pid)
    result = flood(overload_server.url, FILES, seconds=6, concurrency=CLIENTS)
    peak = peak_rss_mib(pid)
    print(f"\noverload: {result.summary()}\n  rss idle={idle:.0f} MiB peak={peak:.0f} MiB after={rss_mib(pid):.0f} MiB")

    assert result.lost == [], result.lost[:5]
    assert result.answered == result.sent
    assert set(result.statuses) <= {200, 503}, result.statuses
    assert result.statuses[200] > 0 and result.statuses[503] > 0  # really over capacity, still serving
    assert result.bad_bodies == [] and result.missing_retry_after == 0
    # Both bounds did the refusing: the model's queue and the in-flight limit.
    assert set(result.errors) == {
        "server overloaded: the model's queue is full, retry later",
        "server overloaded: too many requests in flight, retry later",
    }, result.errors
    assert peak - idle < PEAK_GROWTH_MIB
    assert_alive_and_ready(overload_server)


def test_flood_with_deadlines_answers_200_503_or_504(overload_server) -> None:
    result = flood(
        overload_server.url, FILES, seconds=4, concurrency=CLIENTS, headers={"X-Request-Timeout-Ms": "40"}
    )
    print(f"\noverload with 40 ms deadlines: {result.summary()}")
    assert result.lost == [] and result.answered == result.sent
    assert set(result.statuses) <= {200, 503, 504}, result.statuses
    assert result.statuses[504] > 0
    assert result.bad_bodies == [] and result.missing_retry_after == 0
    assert_alive_and_ready(overload_server)


def test_a_deadline_frees_queued_work_that_has_not_started(slow_repository, tmp_path_factory) -> None:
    """A request stuck behind a long one past its deadline gets 504 and its images are never run.

    The server's default deadline (30 ms) applies to the late request; the long one extends its own
    with the header.
    """
    with running_server(
        slow_repository.root, "slow", tmp_path_factory.mktemp("logs"), "--max-batch-size", "1",
        "--log-level", "debug", "--request-timeout-ms", "30",
    ) as server:  # fmt: skip
        long_files = [("images", (f"l{i}.png", PNG, "image/png")) for i in range(48)]
        with httpx.Client(base_url=server.url, timeout=60) as a, httpx.Client(base_url=server.url, timeout=60) as b:
            holder: dict[str, httpx.Response] = {}
            extended = {"X-Request-Timeout-Ms": "120000"}
            t = threading.Thread(
                target=lambda: holder.setdefault("long", a.post("/classify", files=long_files, headers=extended))
            )
            t.start()
            # Wait until the long request is running, then queue a short one with the default budget.
            for _ in range(200):
                if "ran batch of 1" in server.log():
                    break
                threading.Event().wait(0.02)
            late = b.post("/classify", files=[("images", ("late.png", PNG, "image/png"))])
            t.join(60)
        assert late.status_code == 504, late.text
        assert "deadline of 30 ms exceeded" in late.json()["error"]
        assert holder["long"].status_code == 200
        batches = [int(n) for n in re.findall(r"ran batch of (\d+)", server.log())]
        assert sum(batches) == 48  # the long request's images only: the late one never ran
