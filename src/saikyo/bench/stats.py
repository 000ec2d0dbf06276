"""Latency statistics.

Percentiles use the nearest-rank method: the p-th percentile of n sorted samples is the sample at
rank ceil(p/100 * n) (1-based). It is always a latency that was actually observed, never an
interpolation between two, and it never understates the tail: with 10 samples p99 is the maximum.
(numpy calls this method "inverted_cdf".)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values; 0 < p <= 100."""
    if not sorted_values:
        raise ValueError("percentile of no samples")
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], not {p}")
    rank = math.ceil(p / 100 * len(sorted_values))
    return float(sorted_values[max(rank, 1) - 1])


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
        if not values:
            raise ValueError("no latencies to summarise")
        s = sorted(values)
        return cls(
            count=len(s),
            mean=math.fsum(s) / len(s),
            p50=percentile(s, 50),
            p90=percentile(s, 90),
            p99=percentile(s, 99),
            min=float(s[0]),
            max=float(s[-1]),
        )
