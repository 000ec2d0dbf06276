"""The load generator: POST /classify in the 2018 way, in a closed loop, or in an open loop.

Two wire formats carry the same images: `classify` (multipart/form-data, the 2018 API) and `v2` (the Open
Inference Protocol's infer call with the encoded images as one BYTES input `images` of shape [N, 1] in its
binary extension, asking for the top 5 of output `probabilities` by the classification extension: what a
Triton client sends, answered by saikyo's v2 route and by Triton itself).

    seed    the 2018 method: warm-up request(s), then N sequential requests; mean response time
    closed  C workers, each sending its next request when the previous answered, for S seconds
    open    requests scheduled at Poisson arrival times (R per second) for S seconds, whether or not
            earlier ones have answered; latency counts from the *scheduled* send time, so a request
            that waited behind a slow one (in the server or in this client) carries that wait. That is
            what a user would see, and what a closed loop hides ("coordinated omission"). An optional
            warm-up of W seconds at the same rate comes first and is not measured.

The client shares the machine with the server when both run here, so it is kept cheap: one asyncio
loop, aiohttp with keep-alive connections, and the request body built once per run.
Latency statistics are over successful requests; failures are counted by kind.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from saikyo.bench.stats import LatencySummary

if TYPE_CHECKING:  # aiohttp is imported when a run starts: the CLI loads without the bench extra
    import aiohttp

MODES = ("seed", "closed", "open")
PROTOCOLS = ("classify", "v2")
V2_INPUT, V2_OUTPUT, V2_TOP_K = "images", "probabilities", 5
IMAGE_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".gif": "image/gif",
}


class LoadError(RuntimeError):
    """The run could not start: server unreachable, or the warm-up request was refused."""


# --- what is sent


def bundled_cat() -> tuple[str, bytes]:
    return "cat.jpg", resources.files("saikyo.bench").joinpath("data/cat.jpg").read_bytes()


def read_images(directory: Path | None) -> list[tuple[str, bytes]]:
    """(filename, bytes) for every image file in `directory` (sorted), or the bundled cat photo."""
    if directory is None:
        return [bundled_cat()]
    files = sorted(p for p in Path(directory).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_TYPES)
    if not files:
        raise LoadError(f"no images ({', '.join(IMAGE_TYPES)}) in {directory}")
    return [(p.name, p.read_bytes()) for p in files]


def multipart_body(images: Sequence[tuple[str, bytes]], count: int) -> tuple[bytes, str]:
    """One multipart/form-data body with `count` files in the `images` field (cycling through `images`).

    Built once and reused by every request of a run: the client's CPU goes to sending, not encoding.
    """
    if count < 1:
        raise ValueError("images per request must be at least 1")
    boundary = f"saikyo-{uuid.uuid4().hex}"
    parts: list[bytes] = []
    for i in range(count):
        name, data = images[i % len(images)]
        ctype = IMAGE_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n".encode()
        )
        parts.append(data)
        parts.append(b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def v2_body(images: Sequence[tuple[str, bytes]], count: int) -> tuple[bytes, dict[str, str]]:
    """One v2 infer body with `count` encoded images (cycling through `images`), built once per run."""
    if count < 1:
        raise ValueError("images per request must be at least 1")
    blob = b"".join(
        len(data).to_bytes(4, "little") + data for data in (images[i % len(images)][1] for i in range(count))
    )  # BYTES elements: a 4-byte little-endian length, then the bytes
    header = json.dumps({
        "inputs": [{"name": V2_INPUT, "datatype": "BYTES", "shape": [count, 1],
                    "parameters": {"binary_data_size": len(blob)}}],
        "outputs": [{"name": V2_OUTPUT, "parameters": {"classification": V2_TOP_K}}],
    }).encode()  # fmt: skip
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    return header + blob, headers


def v2_infer_url(base_url: str, model: str) -> str:
    from urllib.parse import quote

    return f"{base_url.rstrip('/')}/v2/models/{quote(model, safe='')}/infer"


def classify_url(base_url: str, model: str | None) -> str:
    from urllib.parse import quote

    url = base_url.rstrip("/") + "/classify"
    return f"{url}?model={quote(model, safe='')}" if model else url


def poisson_schedule(rate: float, seconds: float, seed: int = 0) -> list[float]:
    """Send offsets (seconds from the start) of a Poisson process with `rate` arrivals per second."""
    if rate <= 0 or seconds <= 0:
        raise ValueError("rate and seconds must be positive")
    rng = random.Random(seed)
    offsets: list[float] = []
    t = rng.expovariate(rate)
    while t < seconds:
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


# --- what is measured


@dataclass(frozen=True)
class LoadSpec:
    url: str  # server base URL
    model: str | None = None  # None: the server's default model (no `model` parameter sent)
    mode: str = "seed"
    protocol: str = "classify"  # or "v2" (needs `model`)
    images_per_request: int = 1
    requests: int = 10  # seed mode
    warmup: int = 1  # requests before measuring, not counted
    concurrency: int = 1  # closed mode
    rate: float | None = None  # open mode, requests per second
    seconds: float = 10.0  # closed and open modes
    warmup_seconds: float = 0.0  # open mode: the same arrivals for this long first, sent but not measured
    timeout: float = 60.0  # per request
    max_outstanding: int = 256  # open mode: requests in flight at once; beyond it a request is dropped
    seed: int = 0  # open mode: the arrival schedule's random seed
    schedule: tuple[float, ...] | None = None  # open mode: explicit send offsets instead of Poisson
    api_key: str | None = field(default=None, repr=False)  # sent as "Authorization: Bearer <key>"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {self.protocol!r}")
        if self.protocol == "v2" and not self.model:
            raise ValueError("the v2 protocol names the model in its URL: give the model")
        if self.images_per_request < 1:
            raise ValueError("images per request must be at least 1")
        if self.mode == "seed" and self.requests < 1:
            raise ValueError("seed mode needs at least one request")
        if self.mode == "closed" and self.concurrency < 1:
            raise ValueError("closed mode needs concurrency of at least 1")
        if self.mode == "open" and self.schedule is None and not (self.rate and self.rate > 0):
            raise ValueError("open mode needs a positive --rate")
        if self.mode in ("closed", "open") and self.seconds <= 0:
            raise ValueError("--seconds must be positive")
        if self.max_outstanding < 1:
            raise ValueError("max outstanding must be at least 1")
        if self.warmup_seconds < 0:
            raise ValueError("warm-up seconds must not be negative")

    def offsets(self) -> list[float]:
        """Send offsets from the start of the run, warm-up included (open mode)."""
        if self.schedule is not None:
            return sorted(self.schedule)
        assert self.rate is not None
        return poisson_schedule(self.rate, self.warmup_seconds + self.seconds, self.seed)


@dataclass(frozen=True)
class Sample:
    """One request. Times are time.perf_counter() seconds; `scheduled` is when it was due to be sent."""

    scheduled: float
    sent: float | None  # None: never sent (dropped)
    done: float | None
    error: str | None = None  # None: 200 with one prediction per image; else "503", "timeout", ...

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency_ms(self) -> float:
        assert self.done is not None
        return (self.done - self.scheduled) * 1000.0


@dataclass
class LoadResult:
    spec: LoadSpec
    started: float  # perf_counter() when measuring began
    samples: list[Sample] = field(default_factory=list)

    @property
    def finished(self) -> float:
        ends = [s.done for s in self.samples if s.done is not None]
        return max(ends) if ends else self.started

    @property
    def duration_s(self) -> float:
        return max(self.finished - self.started, 1e-9)

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.ok]

    def errors_by_kind(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for s in self.samples:
            if s.error is not None:
                kinds[s.error] = kinds.get(s.error, 0) + 1
        return dict(sorted(kinds.items()))

    def latency(self) -> LatencySummary | None:
        ok = self.ok
        return LatencySummary.of([s.latency_ms for s in ok]) if ok else None

    def requests_per_s(self) -> float:
        return len(self.ok) / self.duration_s

    def images_per_s(self) -> float:
        return len(self.ok) * self.spec.images_per_request / self.duration_s


Progress = Callable[[int, float], None]  # (requests finished, seconds since start)


class _Client:
    def __init__(self, session: "aiohttp.ClientSession", spec: LoadSpec, images: Sequence[tuple[str, bytes]]) -> None:
        import yarl

        self.session = session
        self.v2 = spec.protocol == "v2"
        if self.v2:
            assert spec.model is not None
            url = v2_infer_url(spec.url, spec.model)
            self.body, self.headers = v2_body(images, spec.images_per_request)
        else:
            url = classify_url(spec.url, spec.model)
            self.body, content_type = multipart_body(images, spec.images_per_request)
            self.headers = {"Content-Type": content_type}
        self.url = yarl.URL(url, encoded=True)  # parsed once, not per request
        if spec.api_key:
            self.headers["Authorization"] = f"Bearer {spec.api_key}"
        self.n = spec.images_per_request
        self.finished = 0

    async def send(self, scheduled: float) -> Sample:
        import aiohttp

        sent = time.perf_counter()
        error: str | None = None
        try:
            async with self.session.post(self.url, data=self.body, headers=self.headers) as resp:
                payload = await resp.read()
                status = resp.status
        except asyncio.TimeoutError:
            error = "timeout"
        except aiohttp.ClientError:
            error = "connection"
        done = time.perf_counter()
        self.finished += 1
        if error is None:
            if status != 200:
                error = str(status)
            elif not self._one_prediction_per_image(payload):
                error = "bad_response"
        return Sample(scheduled, sent, done, error)

    def _one_prediction_per_image(self, payload: bytes) -> bool:
        try:
            body = json.loads(payload)
        except ValueError:
            return False
        if not self.v2:
            return isinstance(body, list) and len(body) == self.n
        try:  # the classification output: BYTES [N, k]
            return [o["shape"][0] for o in body["outputs"] if o["name"] == V2_OUTPUT] == [self.n]
        except (TypeError, KeyError, IndexError):
            return False

    async def warm_up(self, count: int) -> None:
        """Requests that are not measured; the first one also proves the server answers at all."""
        import aiohttp

        for _ in range(count):
            try:
                async with self.session.post(self.url, data=self.body, headers=self.headers) as resp:
                    payload = await resp.read()
                    if resp.status != 200:
                        raise LoadError(
                            f"warm-up request to {self.url} answered {resp.status}: "
                            f"{payload[:500].decode(errors='replace')}"
                        )
            except aiohttp.ClientConnectorError as exc:
                raise LoadError(
                    f"nothing answers at {exc.host}:{exc.port} ({os.strerror(exc.os_error.errno or 0)}): "
                    "start the server (saikyo serve) or pass the --url of a running one"
                ) from None
            except asyncio.TimeoutError:
                raise LoadError(f"warm-up request to {self.url} had no answer within the --timeout") from None
            except aiohttp.ClientError as exc:
                raise LoadError(f"warm-up request to {self.url} failed: {type(exc).__name__}: {exc}") from None
        self.finished = 0


async def run_load(
    spec: LoadSpec,
    images: Sequence[tuple[str, bytes]] | None = None,
    progress: Progress | None = None,
) -> LoadResult:
    import aiohttp

    connections = {"seed": 1, "closed": spec.concurrency, "open": spec.max_outstanding}[spec.mode]
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=spec.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        client = _Client(session, spec, images or [bundled_cat()])
        await client.warm_up(spec.warmup)
        result = LoadResult(spec, started=time.perf_counter())
        ticker = asyncio.create_task(_tick(progress, client, result.started)) if progress else None
        try:
            if spec.mode == "seed":
                await _seed(client, spec, result)
            elif spec.mode == "closed":
                await _closed(client, spec, result)
            else:
                await _open(client, spec, result)
        finally:
            if ticker is not None:
                ticker.cancel()
        if progress is not None:
            progress(client.finished, time.perf_counter() - result.started)
        return result


async def _tick(progress: Progress, client: _Client, started: float) -> None:
    while True:
        progress(client.finished, time.perf_counter() - started)
        await asyncio.sleep(0.25)


async def _seed(client: _Client, spec: LoadSpec, result: LoadResult) -> None:
    for _ in range(spec.requests):
        result.samples.append(await client.send(time.perf_counter()))


async def _closed(client: _Client, spec: LoadSpec, result: LoadResult) -> None:
    deadline = result.started + spec.seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            result.samples.append(await client.send(time.perf_counter()))

    await asyncio.gather(*(worker() for _ in range(spec.concurrency)))


async def _open(client: _Client, spec: LoadSpec, result: LoadResult) -> None:
    in_flight: set[asyncio.Task[Sample]] = set()
    start = result.started

    def finished(task: asyncio.Task[Sample], measured: bool) -> None:
        in_flight.discard(task)
        if measured and not task.cancelled():
            result.samples.append(task.result())

    for offset in spec.offsets():
        due = start + offset
        measured = offset >= spec.warmup_seconds
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= spec.max_outstanding:
            # Counted, not silently skipped: an offered request the client could not even send.
            if measured:
                result.samples.append(Sample(due, None, None, "dropped"))
            continue
        task = asyncio.create_task(client.send(due))
        in_flight.add(task)
        task.add_done_callback(functools.partial(finished, measured=measured))
    if in_flight:
        await asyncio.gather(*in_flight, return_exceptions=True)
    result.started = start + spec.warmup_seconds  # what is measured starts after the warm-up


def rich_progress(spec: LoadSpec, enabled: bool) -> "_RichProgress | None":
    """A live progress bar on a terminal; None (quiet) otherwise."""
    return _RichProgress(spec) if enabled else None


class _RichProgress:
    def __init__(self, spec: LoadSpec) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.spec = spec
        self.by_count = spec.mode == "seed"
        self.bar = Progress(
            TextColumn(f"[bold]{spec.mode}[/] {spec.model or 'default model'} x{spec.images_per_request}"),
            BarColumn(),
            TextColumn("{task.fields[done]} requests"),
            TimeElapsedColumn(),
            transient=True,
        )
        total = spec.requests if self.by_count else spec.seconds
        self.task = self.bar.add_task("load", total=total, done=0)

    def __enter__(self) -> "_RichProgress":
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def __call__(self, finished: int, elapsed: float) -> None:
        completed = finished if self.by_count else min(elapsed, self.spec.seconds)
        self.bar.update(self.task, completed=completed, done=finished)
