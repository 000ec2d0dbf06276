"""Ray Serve path vs the plain server: images/s on the same machine, in one run.

Starts `saikyo serve` (plain) and `saikyo serve --engine ray` side by side on loopback ports (the cost
lab's launcher), waits for both to be ready, then alternates closed-loop load rounds between them
(plain, ray, plain, ray, ...), so a noisy neighbour hits both alike. Each round: a short warm-up, then `--seconds` of measurement.

    python benchmarks/ray_vs_plain.py --repository model-repository --model efficientnet_lite0
    python benchmarks/ray_vs_plain.py ... --replicas 2 --cpus-per-replica 1

Last line: ratio=<ray/plain images/s, medians over rounds> ray_img_s=<x> plain_img_s=<y> ...
Both servers run with the same inference and decode thread counts per process unless --replicas > 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from saikyo.bench.localserver import local_server

ROOT = Path(__file__).resolve().parent.parent
CAT = ROOT / "tests" / "data" / "cat.jpg"


async def load(url: str, model: str, images: int, concurrency: int, seconds: float) -> tuple[float, int, int]:
    """Closed loop: `concurrency` clients, each posting as soon as its last answer arrived.

    Returns (images/s, requests ok, requests failed)."""
    data = CAT.read_bytes()
    ok = failed = 0
    stop_at = time.perf_counter() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal ok, failed
        while time.perf_counter() < stop_at:
            form = aiohttp.FormData()
            for i in range(images):
                form.add_field("images", data, filename=f"cat{i}.jpg", content_type="image/jpeg")
            async with session.post(f"{url}/classify", data=form, params={"model": model}) as r:
                await r.read()
                if r.status == 200:
                    ok += 1
                else:
                    failed += 1

    start = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return ok * images / elapsed, ok, failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=ROOT / "model-repository")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--images-per-request", type=int, default=1)
    ap.add_argument("--replicas", default="1")
    ap.add_argument("--cpus-per-replica", type=float, default=None, help="default: all cores / replicas")
    a = ap.parse_args()

    cores = len(os.sched_getaffinity(0))
    replicas = int(a.replicas)
    cpus = a.cpus_per_replica if a.cpus_per_replica is not None else cores / replicas
    threads = max(1, round(cpus))
    common = ["--log-level", "warning"]
    # Same threads per serving process: the plain server's defaults are one per core.
    ray_args = [*common, "--engine", "ray", "--replicas", a.replicas, "--cpus-per-replica", f"{cpus:g}",
                "--intra-op-threads", str(threads), "--decode-threads", str(threads)]  # fmt: skip
    logs = Path(tempfile.mkdtemp(prefix="ray-vs-plain-"))
    results: dict[str, list[float]] = {"plain": [], "ray": []}
    with contextlib.ExitStack() as stack:
        plain = stack.enter_context(local_server(a.repository, a.model, logs, common, timeout=300))
        ray = stack.enter_context(local_server(a.repository, a.model, logs, ray_args, timeout=300))
        print(f"# {cores} cores; ray: {replicas} replica(s) x {cpus:g} CPU, {threads} thread(s) each; "
              f"concurrency {a.concurrency}, {a.images_per_request} image(s)/request, logs in {logs}")  # fmt: skip
        for r in range(a.rounds):
            for name, url in (("plain", plain.url), ("ray", ray.url)):
                asyncio.run(load(url, a.model, a.images_per_request, a.concurrency, a.warmup))
                img_s, ok, failed = asyncio.run(
                    load(url, a.model, a.images_per_request, a.concurrency, a.seconds)
                )
                results[name].append(img_s)
                print(f"round {r + 1} {name:5s} {img_s:8.1f} img/s  ({ok} ok, {failed} failed)", flush=True)
    p, q = statistics.median(results["plain"]), statistics.median(results["ray"])
    print(
        f"ratio={q / p:.3f} ray_img_s={q:.1f} plain_img_s={p:.1f} replicas={replicas} cpus_per_replica={cpus:g} "
        f"concurrency={a.concurrency} images_per_request={a.images_per_request} rounds={a.rounds}"
    )


if __name__ == "__main__":
    main()
