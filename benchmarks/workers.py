"""`saikyo serve --workers N` against `--workers 1`: images/s on the same machine, in one run.

Starts plain servers with `--workers 1` and with each `--workers N` side by side on loopback ports (the
cost lab's launcher), every one with its default threads (the single process one per core, each of N
workers its share, cores // N), waits until all are ready, then alternates closed-loop load rounds
between them (the cost lab's load generator), so a noisy neighbour hits all alike. Each round: a short
warm-up, then `--seconds` of measurement; the medians over rounds are compared.

    # 2 cores: compute-bound and overhead-bound
    python benchmarks/workers.py --repository model-repository --model resnet50 \\
        --images-per-request 8 --concurrency 8 --workers 2
    python benchmarks/workers.py --repository model-repository --model squeezenet1_1-int8 \\
        --images-per-request 1 --concurrency 16 --workers 2
    # many cores, with the raw multi-process ceiling (the model run in N processes, no HTTP):
    # benchmarks/workers.sh runs this for squeezenet1_1-int8 and resnet50-int8 in a few minutes
    python benchmarks/workers.py ... --workers 2,4,8 --raw

`--raw` first measures, for 1 and each N, the same model in-process in that many processes at once
(benchmarks/server_vs_raw.py's pipeline: a decode pool overlapping full batches, threads sized as the
workers'), before any server starts.

Last line: ratio=<N-workers img/s / 1-worker img/s> workers=N ... (for the best N when several are
given; one `# workers=N` line precedes it for each). With --raw it also carries raw_img_s (N processes)
and of_raw=<N-workers server img/s / raw N-process img/s>.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from pathlib import Path
from queue import Queue

from server_vs_raw import raw_throughput

from saikyo.bench.load import LoadSpec, read_images, run_load
from saikyo.bench.localserver import local_server
from saikyo.models.repository import ModelRepository
from saikyo.settings import Settings, available_cores

ROOT = Path(__file__).resolve().parent.parent
CAT = ROOT / "tests" / "data" / "cat.jpg"


@dataclass
class Measured:
    img_s: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.img_s)


def _raw_one(settings: Settings, model: str, data: bytes, seconds: float, barrier: Barrier, out: Queue) -> None:
    out.put(raw_throughput(settings, model, data, seconds, start=barrier.wait))


def raw_ceiling(settings: Settings, model: str, processes: int, seconds: float) -> float:
    """Images/s of `processes` processes running the model at once, each with its share of the cores."""
    context = multiprocessing.get_context("spawn")
    barrier, out = context.Barrier(processes), context.Queue()
    sized = settings.sized_to(max(1, available_cores() // processes))
    runs = [
        context.Process(target=_raw_one, args=(sized, model, CAT.read_bytes(), seconds, barrier, out))
        for _ in range(processes)
    ]
    for run in runs:
        run.start()
    total = sum(out.get(timeout=600) for _ in runs)
    for run in runs:
        run.join()
    return total


async def measure(url: str, model: str, images: int, concurrency: int, seconds: float, warmup: float) -> tuple[float, float, int]:
    """One closed-loop round after a warm-up: (images/s, p99 ms, failed requests)."""
    spec = LoadSpec(url=url, model=model, mode="closed", images_per_request=images, concurrency=concurrency,
                    seconds=warmup, warmup=1)  # fmt: skip
    files = read_images(None)
    await run_load(spec, files)
    result = await run_load(LoadSpec(**{**spec.__dict__, "seconds": seconds, "warmup": 0}), files)
    latency = result.latency()
    return result.images_per_s(), latency.p99 if latency else float("nan"), len(result.samples) - len(result.ok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=ROOT / "model-repository")
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--workers", default="2", help="comma-separated worker counts to set beside --workers 1")
    ap.add_argument("--images-per-request", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--device", default="cpu", help="cpu (the default: the cores) | auto | cuda")
    ap.add_argument("--backend", default="auto", help="auto (the server's default) | onnxruntime | openvino | torch")
    ap.add_argument("--raw", action="store_true", help="also measure the raw multi-process ceiling")
    ap.add_argument("--quick", action="store_true", help="one short round: checks the script, measures nothing")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.seconds, a.warmup = 1, 3.0, 1.0
    counts = sorted({int(n) for n in a.workers.split(",")} - {1})
    if not counts:
        sys.exit("--workers: give at least one count above 1")
    if not ModelRepository(a.repository).has(a.model):
        sys.exit(f"{a.model} is not exported in {a.repository}; run: saikyo models export ... --repository {a.repository}")

    cores = available_cores()
    raw: dict[int, float] = {}
    if a.raw:
        settings = Settings(repository=a.repository, models=(a.model,), device=a.device, backend=a.backend)
        for n in [1, *counts]:
            raw[n] = raw_ceiling(settings, a.model, n, a.seconds)
            print(f"raw {n} process(es): {raw[n]:8.1f} img/s", flush=True)

    logs = Path(tempfile.mkdtemp(prefix="workers-bench-"))
    results = {n: Measured() for n in [1, *counts]}
    with contextlib.ExitStack() as stack:
        urls = {
            n: stack.enter_context(
                local_server(a.repository, a.model, logs, ["--workers", str(n), "--device", a.device, "--backend", a.backend, "--log-level", "warning"],
                             timeout=600)  # fmt: skip
            ).url
            for n in results
        }
        print(f"# {cores} cores; workers {', '.join(map(str, results))}; {a.model}, {a.images_per_request} image(s)/"
              f"request, concurrency {a.concurrency}; logs in {logs}", flush=True)  # fmt: skip
        for r in range(a.rounds):
            # Alternate which goes first, so neither always follows the other's round.
            order = list(results) if r % 2 == 0 else list(reversed(results))
            for n in order:
                img_s, p99, failed = asyncio.run(
                    measure(urls[n], a.model, a.images_per_request, a.concurrency, a.seconds, a.warmup)
                )
                results[n].img_s.append(img_s)
                results[n].p99_ms.append(p99)
                results[n].errors += failed
                print(f"round {r + 1} workers={n} {img_s:8.1f} img/s  p99 {p99:7.1f} ms  ({failed} failed)", flush=True)

    one = results[1]
    lines = []
    for n in counts:
        m = results[n]
        line = (
            f"ratio={m.median / one.median:.3f} workers={n} workers_img_s={m.median:.1f} one_img_s={one.median:.1f} "
            f"p99_ms={statistics.median(m.p99_ms):.1f} one_p99_ms={statistics.median(one.p99_ms):.1f} "
            f"errors={m.errors + one.errors} model={a.model} backend={a.backend} images_per_request={a.images_per_request} "
            f"concurrency={a.concurrency} cores={cores} rounds={a.rounds}"
        )
        if raw:
            line += f" raw_img_s={raw[n]:.1f} of_raw={m.median / raw[n]:.3f} raw_one_img_s={raw[1]:.1f}"
        lines.append((m.median, line))
        print(f"# {line}")
    print(max(lines)[1])


if __name__ == "__main__":
    main()
