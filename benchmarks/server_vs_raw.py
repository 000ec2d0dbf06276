"""Server vs raw runtime, same machine, same image bytes, one run.

raw:    the best in-process pipeline with the same code and no HTTP: saikyo.inference.imaging.decode in a thread
        pool sized like the server's, inference in batches of the same max size on one runner thread,
        decode overlapping inference.
server: the real `saikyo serve` on a loopback port, driven by a closed-loop client (aiohttp, multipart
        bodies built once) at the given concurrency and images per request.

Last line: ratio=<server/raw img/s> server_img_s=<x> raw_img_s=<y> p50_ms=<..> p99_ms=<..>
(with --concurrency 1 --images-per-request 1 it is preceded by latency_overhead_ms=<server p50 - raw p50>).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from saikyo.inference import imaging
from saikyo.bench.localserver import local_server
from saikyo.models.repository import ModelRepository
from saikyo.runtime import load_runner
from saikyo.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CAT = ROOT / "tests" / "data" / "cat.jpg"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def raw_throughput(
    settings: Settings, name: str, data: bytes, seconds: float, start: Callable[[], object] | None = None
) -> float:
    """Decode in the pool while the runner thread runs full batches; images/s over `seconds`, timed
    from when `start` (e.g. a barrier several processes wait at) returns, after the warm-up."""
    runner = load_runner(name, settings)
    pp = runner.preprocessing
    batch = settings.max_batch_size
    pool = ThreadPoolExecutor(settings.resolved_decode_threads())
    buf = np.empty((batch, pp.input_size, pp.input_size, 3), np.uint8)
    runner.infer_pixels(buf)  # warm-up
    if start is not None:
        start()
    # Keep two batches of decodes in flight so decode overlaps inference, as in the server.
    inflight: collections.deque[Future[np.ndarray]] = collections.deque(
        pool.submit(imaging.decode, data, pp) for _ in range(2 * batch)
    )
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(batch):
            buf[i] = inflight.popleft().result()
            inflight.append(pool.submit(imaging.decode, data, pp))
        runner.infer_pixels(buf)
        done += batch
    elapsed = time.perf_counter() - start
    for f in inflight:
        f.cancel()
    pool.shutdown()
    runner.close()
    return done / elapsed


def raw_latency(settings: Settings, name: str, data: bytes, n: int = 200) -> float:
    """p50 of decode + infer for one image, sequentially: what a lone request costs without HTTP."""
    runner = load_runner(name, settings)
    pp = runner.preprocessing
    pool = ThreadPoolExecutor(1)
    for _ in range(10):
        runner.infer_pixels(imaging.decode(data, pp)[None])
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        px = pool.submit(imaging.decode, data, pp).result()
        runner.infer_pixels(px[None])
        times.append((time.perf_counter() - t0) * 1000)
    pool.shutdown()
    runner.close()
    return percentile(times, 50)


def multipart(data: bytes, n: int) -> tuple[bytes, str]:
    boundary = "saikyobench"
    part = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"cat.jpg\"\r\n"
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode() + data + b"\r\n"
    return part * n + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def drive(url: str, body: bytes, ctype: str, concurrency: int, seconds: float) -> tuple[float, list[float], int]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one() -> None:
            nonlocal errors
            t0 = time.perf_counter()
            async with session.post(f"{url}/classify", data=body, headers={"Content-Type": ctype}) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
                    return
            latencies.append((time.perf_counter() - t0) * 1000)

        async def worker(stop: float) -> None:
            while time.perf_counter() < stop:
                await one()

        warm = time.perf_counter() + min(3.0, seconds / 4)
        await asyncio.gather(*(worker(warm) for _ in range(concurrency)))
        latencies.clear()
        start = time.perf_counter()
        await asyncio.gather(*(worker(start + seconds) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return elapsed, latencies, errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="squeezenet1_1")
    ap.add_argument("--images-per-request", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--repository", default=os.environ.get("SAIKYO_REPOSITORY", "model-repository"))
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-delay-ms", type=float, default=0.0)
    ap.add_argument("--intra-op-threads", type=int, default=0)
    ap.add_argument("--decode-threads", type=int, default=0)
    ap.add_argument("--image", type=Path, default=CAT)
    args = ap.parse_args()

    settings = Settings.from_env(
        repository=args.repository, models=args.model, max_batch_size=args.max_batch_size,
        max_delay_ms=args.max_delay_ms, intra_op_threads=args.intra_op_threads, decode_threads=args.decode_threads,
    )  # fmt: skip
    if not ModelRepository(settings.repository).has(args.model):
        sys.exit(f"{args.model} is not exported in {settings.repository}; run: saikyo models export {args.model}")
    data = args.image.read_bytes()
    single = args.concurrency == 1 and args.images_per_request == 1

    raw_img_s = raw_throughput(settings, args.model, data, args.seconds)
    print(f"raw: {raw_img_s:.1f} img/s", flush=True)
    raw_p50 = raw_latency(settings, args.model, data) if single else None

    body, ctype = multipart(data, args.images_per_request)
    server_args = [
        "--max-batch-size", str(settings.max_batch_size), "--max-delay-ms", str(settings.max_delay_ms),
        "--intra-op-threads", str(settings.intra_op_threads), "--decode-threads", str(settings.decode_threads),
        "--log-level", "warning",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as logs, local_server(
        settings.repository, args.model, Path(logs), server_args
    ) as server:
        elapsed, lat, errors = asyncio.run(drive(server.url, body, ctype, args.concurrency, args.seconds))
    server_img_s = len(lat) * args.images_per_request / elapsed
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    print(f"server: {server_img_s:.1f} img/s, {len(lat)} requests, {errors} errors", flush=True)
    if single and raw_p50 is not None:
        print(f"latency_overhead_ms={p50 - raw_p50:.2f}")
    print(
        f"ratio={server_img_s / raw_img_s:.3f} server_img_s={server_img_s:.1f} raw_img_s={raw_img_s:.1f} "
        f"p50_ms={p50:.1f} p99_ms={p99:.1f}"
    )


if __name__ == "__main__":
    main()
