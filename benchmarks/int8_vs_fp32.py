"""In-process inference only (no decode): images/s of NAME-int8 vs NAME at a batch size, interleaved."""

from __future__ import annotations

import argparse
import time

import numpy as np

from saikyo.runtime import load_runner
from saikyo.settings import Settings


def img_s(runner, batch: np.ndarray, seconds: float) -> float:
    runner.infer_pixels(batch)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        runner.infer_pixels(batch)
        n += len(batch)
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="resnet50,squeezenet1_1,efficientnet_lite0")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repository", default="model-repository")
    args = ap.parse_args()
    for name in args.models.split(","):
        s = Settings.from_env(repository=args.repository, models=name)
        fp32, int8 = load_runner(name, s), load_runner(f"{name}-int8", s)
        size = fp32.preprocessing.input_size
        batch = np.random.default_rng(0).integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)
        a, b = [], []
        for _ in range(args.rounds):
            a.append(img_s(fp32, batch, args.seconds))
            b.append(img_s(int8, batch, args.seconds))
        fa, fb = max(a), max(b)
        print(f"{name}: fp32 {fa:.1f} img/s, int8 {fb:.1f} img/s, int8/fp32 = {fb / fa:.2f}x (batch {args.batch})")


if __name__ == "__main__":
    main()
