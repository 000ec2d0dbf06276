"""How the GIL switch interval stretches forward passes under HTTP load, in one run.

The runner thread gives the GIL up around every native call (session.run, each torch op, the copy to
the host) and must get it back between them. While the event loop or a decode thread runs Python, a
waiting thread gets the GIL only when the holder's switch interval runs out: 5 ms by default. So a
forward pass of a few native calls can stretch by several intervals, and the runner -- the one thing
that must never wait -- is the thread that waits.

Part 1, no server: a loop of 20 short torch ops (the runner's pattern) timed alone and beside one or
four threads busy in Python, at several intervals. Part 2: servers that differ only in
SAIKYO_GIL_SWITCH_INTERVAL_MS, up side by side, closed-loop load rounds alternating between them;
from each server's /metrics, the mean time a forward pass took and the mean batch size.

    python benchmarks/gil_switch.py --repository model-repository --model efficientnet_lite0
    python benchmarks/gil_switch.py --intervals 5,0.5 --rounds 3 --seconds 8 --concurrency 16

Last line: ratio=<img/s at the last interval / img/s at the first, medians over rounds> ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from saikyo.bench.load import LoadSpec, run_load
from saikyo.bench.localserver import local_server

ROOT = Path(__file__).resolve().parent.parent


def runner_pattern(intervals: list[float]) -> None:
    import torch

    torch.set_num_threads(1)
    x = torch.randn(64, 64)
    payload = {"a": list(range(200)), "b": {"c": "x" * 100}}

    def iteration() -> None:
        y = x
        for _ in range(10):
            y = torch.mm(y, x) * 0.01  # two native calls, each giving the GIL up and taking it back

    def busy(stop: threading.Event) -> None:
        while not stop.is_set():
            json.loads(json.dumps(payload))  # Python holding the GIL, as an event loop under load does

    default = sys.getswitchinterval()
    try:
        for ms in intervals:
            sys.setswitchinterval(ms / 1000)
            row = []
            for busy_threads in (0, 1, 4):
                stop = threading.Event()
                threads = [threading.Thread(target=busy, args=(stop,)) for _ in range(busy_threads)]
                for t in threads:
                    t.start()
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < 1.0:
                    iteration()
                    n += 1
                row.append((time.perf_counter() - start) / n * 1000)
                stop.set()
                for t in threads:
                    t.join()
            print(f"pattern  interval {ms:5.2f} ms: 20 ops take {row[0]:7.3f} ms alone, "
                  f"{row[1]:7.3f} ms beside 1 busy thread, {row[2]:7.3f} ms beside 4", flush=True)  # fmt: skip
    finally:
        sys.setswitchinterval(default)


def forward_stats(url: str, model: str) -> tuple[float, float, float]:
    """(forward passes, their total seconds, images) so far, from the server's /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    count = seconds = images = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") != model:
                continue
            if s.name == "saikyo_inference_duration_seconds_count":
                count = s.value
            elif s.name == "saikyo_inference_duration_seconds_sum":
                seconds = s.value
            elif s.name == "saikyo_images_total":
                images = s.value
    return count, seconds, images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=ROOT / "model-repository")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--intervals", default="5,0.5", help="milliseconds, comma-separated; the first is the baseline")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--images-per-request", type=int, default=1)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--skip-pattern", action="store_true", help="skip part 1")
    a = ap.parse_args()
    intervals = [float(v) for v in a.intervals.split(",")]
    if not a.skip_pattern:
        runner_pattern(intervals)

    logs = Path(tempfile.mkdtemp(prefix="gil-switch-"))
    args = ["--log-level", "warning", "--max-batch-size", str(a.max_batch_size)]
    img_s: dict[float, list[float]] = {ms: [] for ms in intervals}
    with contextlib.ExitStack() as stack:
        servers = {
            ms: stack.enter_context(
                local_server(a.repository, a.model, logs, args, env={"SAIKYO_GIL_SWITCH_INTERVAL_MS": str(ms)})
            )
            for ms in intervals
        }
        print(f"# {a.model}, concurrency {a.concurrency}, {a.images_per_request} image(s)/request, "
              f"max batch {a.max_batch_size}; logs in {logs}", flush=True)  # fmt: skip
        for r in range(a.rounds):
            for ms, server in servers.items():
                spec = LoadSpec(url=server.url, model=a.model, mode="closed", concurrency=a.concurrency,
                                seconds=a.seconds, warmup=a.concurrency, images_per_request=a.images_per_request)  # fmt: skip
                before = forward_stats(server.url, a.model)
                result = asyncio.run(run_load(spec))
                after = forward_stats(server.url, a.model)
                passes, busy_s, images = (y - x for x, y in zip(before, after))
                latency = result.latency()
                img_s[ms].append(result.images_per_s())
                print(f"round {r + 1} interval {ms:5.2f} ms: {result.images_per_s():7.1f} img/s  "
                      f"p50 {latency.p50 if latency else float('nan'):7.1f} ms  "
                      f"p99 {latency.p99 if latency else float('nan'):7.1f} ms  "
                      f"forward pass {busy_s / max(passes, 1) * 1000:6.2f} ms for {images / max(passes, 1):5.1f} images  "
                      f"errors {len(result.samples) - len(result.ok)}", flush=True)  # fmt: skip
    base, last = statistics.median(img_s[intervals[0]]), statistics.median(img_s[intervals[-1]])
    print(f"ratio={last / base:.3f} img_s_at_{intervals[-1]:g}ms={last:.1f} img_s_at_{intervals[0]:g}ms={base:.1f} "
          f"model={a.model} concurrency={a.concurrency} images_per_request={a.images_per_request} rounds={a.rounds}")  # fmt: skip


if __name__ == "__main__":
    main()
