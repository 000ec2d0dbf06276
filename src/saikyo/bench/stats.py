"""Latency statistics.

Percentiles use the nearest-rank method (numpy's method="inverted_cdf"): the p-th percentile of n
samples is the sample at rank ceil(p/100 * n) (1-based). It is always a latency that was actually
observed, never an interpolation between two, and it never understates the tail: with 10 samples p99 is
the maximum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of `values` (sorted or not); 0 < p <= 100."""
    if len(values) == 0:
        raise ValueError("percentile of no samples")
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], not {p}")
    return float(np.percentile(values, p, method="inverted_cdf"))


@dataclass(frozen=True)
class LatencySummary:
    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "LatencySummary":
        if len(values) == 0:
            raise ValueError("no latencies to summarise")
        a = np.asarray(values, dtype=np.float64)
        p50, p90, p99 = np.percentile(a, (50, 90, 99), method="inverted_cdf")
        return cls(
            count=len(a),
            mean=float(np.mean(a)),
            p50=float(p50),
            p90=float(p90),
            p99=float(p99),
            min=float(a.min()),
            max=float(a.max()),
        )
