"""Pick ONNX Runtime thread defaults by measurement: raw pipeline images/s (decode pool + batched
inference, as benchmarks/server_vs_raw.py's raw side) for each (intra-op threads, decode threads,
spinning) setting, interleaved over rounds so that a noisy machine hits every setting alike."""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from server_vs_raw import CAT, raw_throughput  # noqa: E402

from saikyo.settings import Settings, available_cores  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="squeezenet1_1,resnet50")
    ap.add_argument("--repository", default="model-repository")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    cores = available_cores()
    data = CAT.read_bytes()
    grid = list(itertools.product(sorted({1, cores}), sorted({1, cores}), (False, True)))
    for model in args.models.split(","):
        results: dict[tuple, list[float]] = {g: [] for g in grid}
        for _ in range(args.rounds):
            for intra, decode, spin in grid:
                s = Settings.from_env(
                    repository=args.repository, models=model, max_batch_size=args.batch,
                    intra_op_threads=intra, decode_threads=decode, ort_spinning=spin,
                )  # fmt: skip
                results[(intra, decode, spin)].append(raw_throughput(s, model, data, args.seconds))
        best = max(statistics.median(v) for v in results.values())
        print(f"\n{model} (batch {args.batch}, {cores} cores): images/s, median of {args.rounds}")
        for (intra, decode, spin), v in results.items():
            m = statistics.median(v)
            print(f"  intra_op={intra} decode={decode} spinning={'on ' if spin else 'off'}  {m:7.1f}  ({m / best:.2f} of best)")


if __name__ == "__main__":
    main()
