"""The load generator against real HTTP servers on loopback: a recording server of our own (to see
exactly what arrives, and when) and the real saikyo server (tiny models)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import pytest
from aiohttp import web
from support.paths import ROOT

from saikyo.bench.localserver import free_port
from saikyo.bench.load import LoadError, LoadSpec, multipart_body, poisson_schedule, run_load, v2_body


@dataclass
class Arrival:
    arrived: float
    finished: float
    images: int
    model: str | None
    filenames: list[str]


@dataclass
class RecordingServer:
    """POST /classify: counts the multipart `images` parts, optionally holds each request `service_s`
    (one at a time when `serial`), answers the /classify shape, and records every arrival."""

    service_s: float = 0.0
    serial: bool = False
    status_every: tuple[int, int] | None = None  # (k, status): every k-th request answers `status`
    always: int | None = None  # every request answers this status
    key: str | None = None  # when set, requests must carry "Authorization: Bearer <key>"
    arrivals: list[Arrival] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    url: str = ""

    async def classify(self, request: web.Request) -> web.Response:
        arrived = time.perf_counter()
        if self.key and request.headers.get("Authorization") != f"Bearer {self.key}":
            return web.json_response({"error": "unauthorized"}, status=401)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            names = []
            reader = await request.multipart()
            async for part in reader:
                if part.name == "images":
                    names.append(part.filename)
                    await part.read()
            if self.serial:
                async with self._lock:
                    await asyncio.sleep(self.service_s)
            elif self.service_s:
                await asyncio.sleep(self.service_s)
        finally:
            self.in_flight -= 1
        self.arrivals.append(Arrival(arrived, time.perf_counter(), len(names), request.query.get("model"), names))
        n = len(self.arrivals)
        if self.always is not None:
            return web.json_response({"error": "nope"}, status=self.always)
        if self.status_every and n % self.status_every[0] == 0:
            return web.json_response({"error": "overloaded"}, status=self.status_every[1])
        return web.json_response([{"282": 0.9, "281": 0.1}] * len(names))

    @asynccontextmanager
    async def running(self) -> AsyncIterator["RecordingServer"]:
        self._lock = asyncio.Lock()
        app = web.Application()
        app.router.add_post("/classify", self.classify)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        try:
            yield self
        finally:
            await runner.cleanup()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


def test_seed_mode_sends_warmup_then_n_sequential_requests_of_n_images() -> None:
    server = RecordingServer(service_s=0.01)
    images = [("a.jpg", b"\xff\xd8a"), ("b.png", b"\x89PNGb")]

    async def go():
        async with server.running():
            spec = LoadSpec(url=server.url, model="resnet50", mode="seed", images_per_request=3, requests=5, warmup=2)
            return await run_load(spec, images)

    result = run(go())
    assert len(server.arrivals) == 2 + 5  # warm-up requests reach the server but are not measured
    assert len(result.samples) == 5 and all(s.ok for s in result.samples)
    assert all(a.images == 3 for a in server.arrivals)
    assert server.arrivals[0].filenames == ["a.jpg", "b.png", "a.jpg"]  # cycles through the image set
    assert all(a.model == "resnet50" for a in server.arrivals)
    # Sequential: never two at once, and each request arrives only after the previous one finished.
    assert server.max_in_flight == 1
    for before, after in zip(server.arrivals, server.arrivals[1:]):
        assert after.arrived >= before.finished
    measured = server.arrivals[2:]
    for sample, arrival in zip(result.samples, measured):
        assert sample.sent <= arrival.arrived <= arrival.finished <= sample.done
    lat = result.latency()
    assert lat is not None and lat.count == 5 and lat.min >= 10.0  # each held 10 ms by the server
    assert result.images_per_s() == pytest.approx(15 / result.duration_s)


def test_closed_mode_keeps_exactly_c_requests_in_flight() -> None:
    server = RecordingServer(service_s=0.02)

    async def go():
        async with server.running():
            spec = LoadSpec(url=server.url, mode="closed", concurrency=3, seconds=0.5, warmup=0)
            return await run_load(spec)

    result = run(go())
    assert server.max_in_flight == 3
    assert len(result.samples) == len(server.arrivals) >= 6
    assert all(a.model is None for a in server.arrivals)  # no model named: the server's default
    # No request starts after the deadline.
    assert max(s.sent for s in result.samples) <= result.started + 0.5


def test_open_loop_sends_on_schedule_and_latency_includes_queueing() -> None:
    # Arrivals every 50 ms, a server that serves one request per 100 ms: a queue builds. Request k is
    # due at 50k ms and cannot finish before 100(k+1) ms, so its latency from the scheduled send is at
    # least 100 + 50k ms, although the server spends only 100 ms on it.
    server = RecordingServer(service_s=0.1, serial=True)
    schedule = (0.0, 0.05, 0.10, 0.15, 0.20)

    async def go():
        async with server.running():
            spec = LoadSpec(url=server.url, mode="open", schedule=schedule, seconds=1, warmup=0)
            return await run_load(spec)

    result = run(go())
    assert len(result.samples) == 5 and all(s.ok for s in result.samples)
    by_due = sorted(result.samples, key=lambda s: s.scheduled)
    for k, s in enumerate(by_due):
        assert s.scheduled == pytest.approx(result.started + schedule[k])
        assert s.latency_ms >= 100 + 50 * k - 1
    # An open loop does not wait for answers: requests reach the server on schedule (the last at 0.2 s),
    # not 100 ms apart as a closed loop's would (the last at >= 0.4 s).
    arrived = sorted(a.arrived for a in server.arrivals)
    assert arrived[-1] - result.started < 0.35
    assert max(s.latency_ms for s in result.samples) >= 299


def test_open_loop_latency_counts_from_the_scheduled_time_when_the_client_is_late() -> None:
    # Block the client's event loop for 300 ms at the start: every request goes out late. The server
    # answers at once, yet the recorded latency includes the lateness (no coordinated omission).
    server = RecordingServer()
    blocked = []

    def stall(finished: int, elapsed: float) -> None:
        if not blocked:
            blocked.append(True)
            time.sleep(0.3)

    async def go():
        async with server.running():
            spec = LoadSpec(url=server.url, mode="open", schedule=(0.01, 0.02, 0.03), seconds=1, warmup=0)
            return await run_load(spec, progress=stall)

    result = run(go())
    assert blocked and len(result.ok) == 3
    for s in result.samples:
        assert s.sent - s.scheduled >= 0.25  # sent late ...
        assert s.latency_ms >= (s.sent - s.scheduled) * 1000  # ... and the lateness is in the latency
    assert result.latency().min >= 250


def test_open_loop_drops_beyond_max_outstanding_and_counts_them() -> None:
    server = RecordingServer(service_s=0.05, serial=True)

    async def go():
        async with server.running():
            spec = LoadSpec(url=server.url, mode="open", schedule=(0, 0, 0, 0, 0), max_outstanding=2, warmup=0)
            return await run_load(spec)

    result = run(go())
    assert len(server.arrivals) == 2
    assert len(result.samples) == 5
    assert result.errors_by_kind() == {"dropped": 3}
    assert len(result.ok) == 2


def test_open_loop_warmup_is_sent_but_not_measured() -> None:
    server = RecordingServer(service_s=0.01)
    schedule = (0.0, 0.05, 0.2, 0.25)

    async def go():
        async with server.running():
            spec = LoadSpec(url=server.url, mode="open", schedule=schedule, warmup_seconds=0.1, warmup=0)
            return await run_load(spec)

    result = run(go())
    assert len(server.arrivals) == 4  # all four were sent ...
    assert len(result.samples) == 2  # ... the two due after the warm-up are measured
    # Measuring starts when the warm-up ends: the first measured request was due 0.1 s after that.
    assert sorted(s.scheduled - result.started for s in result.samples) == pytest.approx([0.1, 0.15])


def test_errors_are_counted_by_kind_and_left_out_of_latency() -> None:
    server = RecordingServer(status_every=(3, 503))

    async def go():
        async with server.running():
            return await run_load(LoadSpec(url=server.url, mode="seed", requests=9, warmup=0))

    result = run(go())
    assert result.errors_by_kind() == {"503": 3}
    assert result.latency().count == 6


def test_warmup_refusal_stops_the_run_with_the_servers_answer() -> None:
    server = RecordingServer(always=404)

    async def go():
        async with server.running():
            return await run_load(LoadSpec(url=server.url, model="nope", requests=3))

    with pytest.raises(LoadError, match="404"):
        run(go())


def test_api_key_is_sent_as_a_bearer_token() -> None:
    server = RecordingServer(key="s3cret")

    async def go(key):
        async with server.running():
            return await run_load(LoadSpec(url=server.url, requests=2, api_key=key))

    assert len(run(go("s3cret")).ok) == 2
    with pytest.raises(LoadError, match="401"):
        run(go(None))
    assert "s3cret" not in repr(LoadSpec(url="http://x", api_key="s3cret"))


def test_unreachable_server_is_a_load_error() -> None:
    port = free_port()  # bound a moment ago, nobody listens on it now
    with pytest.raises(LoadError, match=f"nothing answers at 127.0.0.1:{port} .*saikyo serve"):
        run(run_load(LoadSpec(url=f"http://127.0.0.1:{port}", requests=1, timeout=5)))


def test_poisson_schedule_rate_and_determinism() -> None:
    offsets = poisson_schedule(rate=100, seconds=100, seed=3)
    assert 9600 <= len(offsets) <= 10400  # mean 10000, sd 100
    assert offsets == sorted(offsets) and offsets[-1] < 100
    gaps = [b - a for a, b in zip([0.0, *offsets], offsets)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.01, rel=0.05)
    assert poisson_schedule(100, 100, seed=3) == offsets
    assert poisson_schedule(100, 100, seed=4) != offsets


def test_multipart_body_is_built_once_with_n_parts() -> None:
    body, ctype = multipart_body([("cat.jpg", b"JPEGDATA")], 4)
    boundary = ctype.split("boundary=")[1]
    assert body.count(f"--{boundary}\r\n".encode()) == 4
    assert body.count(b'name="images"; filename="cat.jpg"') == 4
    assert body.endswith(f"--{boundary}--\r\n".encode())


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_seed_mode_against_the_real_server_counts_requests_and_images(tiny_server) -> None:
    def scrape() -> tuple[float, float]:
        text = httpx.get(f"{tiny_server.url}/metrics", timeout=10).text
        return (
            _metric(text, "saikyo_http_requests_total", route="/classify", model="tiny2", status="200"),
            _metric(text, "saikyo_images_total", model="tiny2"),
        )

    before = scrape()
    result = run(run_load(LoadSpec(url=tiny_server.url, model="tiny2", images_per_request=3, requests=6, warmup=1)))
    after = scrape()
    assert len(result.ok) == 6
    assert after[0] - before[0] == 7  # warm-up + 6
    assert after[1] - before[1] == 7 * 3


def test_v2_protocol_sends_the_images_as_one_bytes_input_and_reads_the_top_k(tiny_server) -> None:
    """--protocol v2 (a Triton client's request) against the real server: the images go through the v2
    infer route, and each answer must hold the top 5 of every image."""
    def scrape() -> tuple[float, float]:
        text = httpx.get(f"{tiny_server.url}/metrics", timeout=10).text
        return (
            _metric(text, "saikyo_http_requests_total", route="/v2/models/{model_name}/infer", model="tiny2",
                    status="200"),
            _metric(text, "saikyo_images_total", model="tiny2"),
        )  # fmt: skip

    before = scrape()
    spec = LoadSpec(url=tiny_server.url, model="tiny2", protocol="v2", images_per_request=3, requests=4, warmup=1)
    result = run(run_load(spec))
    after = scrape()
    assert len(result.ok) == 4, result.errors_by_kind()
    assert (after[0] - before[0], after[1] - before[1]) == (5, 5 * 3)
    body, headers = v2_body([("a.jpg", b"JPEG1"), ("b.jpg", b"JPEG22")], 3)
    header = json.loads(body[: int(headers["Inference-Header-Content-Length"])])
    assert header["inputs"][0]["shape"] == [3, 1]
    assert body.endswith(b"\x05\x00\x00\x00JPEG1\x06\x00\x00\x00JPEG22\x05\x00\x00\x00JPEG1")
    assert header["outputs"] == [{"name": "probabilities", "parameters": {"classification": 5}}]
    with pytest.raises(ValueError, match="names the model"):
        LoadSpec(url=tiny_server.url, protocol="v2")
    with pytest.raises(ValueError, match="protocol must be one of"):
        LoadSpec(url=tiny_server.url, protocol="grpc")


def test_bench_run_cli_appends_a_record_with_the_design_fields(tiny_server, tmp_path) -> None:
    out = tmp_path / "runs.jsonl"
    cmd = [sys.executable, "-m", "saikyo", "bench", "run", "--url", tiny_server.url, "--model", "tiny",
           "--images-per-request", "2", "--requests", "4", "--instance-type", "c7i.large", "--out", str(out)]  # fmt: skip
    for _ in range(2):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 2  # appended, not overwritten
    rec = json.loads(lines[-1])
    for key in ("url", "model", "backend", "device", "hardware", "instance_type", "price_per_hour",
                "images_per_request", "concurrency", "rate", "duration_s", "requests", "errors",
                "latency_mean_ms", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "images_per_s",
                "cost_performance_kimg_per_usd"):  # fmt: skip
        assert key in rec, key
    assert rec["url"] == tiny_server.url and rec["model"] == "tiny" and rec["mode"] == "seed"
    assert rec["protocol"] == "classify"
    assert (rec["requests"], rec["errors"], rec["images_per_request"], rec["concurrency"]) == (4, 0, 2, 1)
    assert rec["backend"] == "onnxruntime" and rec["device"] == "cpu"  # from the server's v2 metadata
    assert rec["workers"] == 1
    assert re.search(r"\d+ cores", rec["hardware"])
    assert rec["instance_type"] == "c7i.large" and rec["price_per_hour"] == pytest.approx(0.08925)
    assert rec["latency_p50_ms"] <= rec["latency_p90_ms"] <= rec["latency_p99_ms"]
    assert rec["images_per_s"] == pytest.approx(4 * 2 / rec["duration_s"], rel=0.01)
    assert rec["cost_performance_kimg_per_usd"] == pytest.approx(
        rec["images_per_s"] * 3600 / 0.08925 / 1000, rel=1e-3
    )
