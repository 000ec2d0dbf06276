"""Latency percentiles: nearest rank, always an observed value."""

from __future__ import annotations

import math
import random

import pytest

from saikyo.bench.stats import LatencySummary, percentile


def test_nearest_rank_on_1_to_100() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 90) == 90
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile(values, 0.5) == 1


def test_small_samples_take_the_tail_not_an_interpolation() -> None:
    ten = [float(x) for x in range(10, 110, 10)]  # 10, 20, ..., 100
    assert percentile(ten, 99) == 100  # rank ceil(9.9) = 10: the maximum
    assert percentile(ten, 90) == 90  # rank 9
    assert percentile(ten, 50) == 50  # rank 5
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0], 50) == 1.0


def test_rank_is_ceil_of_p_n_and_always_observed_on_random_samples() -> None:
    rng = random.Random(1)
    for n in (1, 2, 3, 7, 10, 99, 100, 101, 1000, 1234):
        values = [rng.lognormvariate(3, 1) for _ in range(n)]  # unsorted: percentile sorts
        ranked = sorted(values)
        for p in (50, 90, 99, 99.9):
            assert percentile(values, p) == ranked[max(math.ceil(p / 100 * n), 1) - 1]
            assert percentile(values, p) in values


def test_summary_and_errors() -> None:
    s = LatencySummary.of([3.0, 1.0, 2.0, 10.0])
    assert (s.count, s.min, s.max) == (4, 1.0, 10.0)
    assert s.mean == pytest.approx(4.0)
    assert s.p50 == 2.0 and s.p90 == 10.0 and s.p99 == 10.0
    with pytest.raises(ValueError):
        LatencySummary.of([])
    with pytest.raises(ValueError):
        percentile([1.0], 0)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
