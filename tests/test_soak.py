"""Soak: about a minute of steady mixed traffic (good images, several per request, bad files, too many
files, expired deadlines) against a real server. Every request is answered, and resident memory at the
end is within a stated margin of where it stood after warm-up: nothing accumulates per request."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from support.paths import DATA
from support.serverproc import running_server
from support.stress import FloodResult, encode, every_format, flood_requests, multipart_request, noise_image, rss_mib

WARM_UP_S = 12
SOAK_S = 45
CLIENTS = 8
# Stated margin: RSS after the soak may exceed RSS after warm-up by at most this much. One cat.jpg
# (35 kB) kept per request would be ~35 kB x thousands of requests: hundreds of MiB, far over it.
MARGIN_MIB = 16.0

pytestmark = pytest.mark.slow


def mixed_requests(url: str) -> tuple[list[bytes], set[int]]:
    photos = {p.name: p.read_bytes() for p in sorted(DATA.glob("*.jpg"))}
    formats = every_format(seed=11)
    png = encode(noise_image(seed=4), "PNG")
    f = lambda name, data, t="image/jpeg": ("images", (name, data, t))  # noqa: E731
    requests = [
        multipart_request(url, [f("cat.jpg", photos["cat.jpg"])], {}),
        multipart_request(url, [f(n, b) for n, b in photos.items()], {}),
        multipart_request(url, [f(k.lower(), v, "application/octet-stream") for k, v in formats.items()], {}),
        multipart_request(url, [f("notes.txt", b"not an image\n" * 20, "text/plain")], {}),
        multipart_request(url, [f("cut.jpg", photos["cat.jpg"][:5000])], {}),
        multipart_request(url, [("image", ("cat.jpg", photos["cat.jpg"], "image/jpeg"))], {}),
        multipart_request(url, [f(f"{i}.png", png, "image/png") for i in range(9)], {}),  # over 8 images
        multipart_request(url, [f("cat.jpg", photos["cat.jpg"])], {"X-Request-Timeout-Ms": "0.01"}),
    ]
    return requests, {200, 400, 413, 504}


def test_soak_memory_stays_flat(tiny_repository, tmp_path_factory) -> None:
    with running_server(
        tiny_repository.root, "tiny", tmp_path_factory.mktemp("logs"), "--max-images-per-request", "8"
    ) as server:
        pid = server.proc.pid
        requests, expected = mixed_requests(server.url)
        samples: list[tuple[float, float]] = []
        stop = threading.Event()

        def sample() -> None:
            t0 = time.monotonic()
            while not stop.wait(1.0):
                samples.append((time.monotonic() - t0, rss_mib(pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        start_rss = rss_mib(pid)
        sampler.start()
        warm: FloodResult = flood_requests(server.url, requests, seconds=WARM_UP_S, concurrency=CLIENTS)
        after_warm_up = rss_mib(pid)
        soak: FloodResult = flood_requests(server.url, requests, seconds=SOAK_S, concurrency=CLIENTS)
        end_rss = rss_mib(pid)
        stop.set()
        sampler.join()
        peak = max(r for _, r in samples)
        ready = httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code

    growth = end_rss - after_warm_up
    print(
        f"\nsoak: warm-up {warm.summary()}\n      soak {soak.summary()}\n"
        f"      rss start={start_rss:.1f} MiB after warm-up={after_warm_up:.1f} end={end_rss:.1f} "
        f"peak={peak:.1f} growth={growth:+.1f} MiB (margin {MARGIN_MIB} MiB) over {soak.sent} requests"
    )
    for result in (warm, soak):
        assert result.lost == [] and result.answered == result.sent
        assert set(result.statuses) <= expected, result.statuses
        assert result.bad_bodies == []
    assert set(soak.statuses) == expected  # every kind of answer was exercised
    assert growth <= MARGIN_MIB, samples
    assert ready == 200
