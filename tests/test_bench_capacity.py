"""`saikyo bench capacity`: the search finds the known capacity of a deliberately slow server.

tests/support/slowserver.py is an M/D/1 queue (one worker, a fixed service time per image), so the rate at which
its p99 latency reaches a target follows from Erlang's formula for the M/D/1 waiting time. The search
must land near that rate, bracketed by a passing and a failing step within the asked precision.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal, getcontext
from pathlib import Path

import pytest
from support.paths import ROOT
from typer.testing import CliRunner

from saikyo.bench.capacity import CapacitySpec, Step, StepRule, judge, search
from saikyo.bench.load import LoadResult, LoadSpec, Sample
from saikyo.cli import app

SERVICE_MS_PER_IMAGE = 10.0
IMAGES_PER_REQUEST = 2  # so a request holds the worker 20 ms
# Ten service times: the capacity sits at a load of 0.77, where the queue settles within a short step, and
# the target stays well above the stalls (tens of ms) of a busy shared machine.
P99_MS = 200.0
PRECISION = 0.10
STEP_REQUESTS, STEP_MIN_S, STEP_MAX_S = 300, 2, 10


def md1_wait_cdf(t: float, rho: float) -> float:
    """P(wait <= t) in an M/D/1 queue, service time 1, arrival rate rho (Erlang, 1909):
    (1 - rho) * sum_{k=0}^{floor t} (rho (k - t))^k / k! * exp(-rho (k - t)). The alternating sum
    cancels heavily, hence the 100-digit arithmetic."""
    getcontext().prec = 100
    r, tt = Decimal(rho), Decimal(t)
    terms = ((r * (k - tt), k) for k in range(int(t) + 1))
    total = sum((x**k if k else Decimal(1)) / math.factorial(k) * (-x).exp() for x, k in terms)
    return float((1 - r) * total)


def md1_p99_latency(rho: float) -> float:
    """p99 of wait + service, in service times."""
    lo, hi = 0.0, 60.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if md1_wait_cdf(mid, rho) >= 0.99 else (mid, hi)
    return hi + 1


def analytic_capacity(service_s: float, p99_s: float) -> float:
    """The arrival rate (requests/s) at which the M/D/1 p99 latency equals the target."""
    lo, hi = 0.01, 0.99
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if md1_p99_latency(mid) * service_s <= p99_s else (lo, mid)
    return lo / service_s


def test_the_queueing_formula_matches_known_values() -> None:
    # M/D/1 mean wait is rho / (2 (1 - rho)) service times; the CDF must integrate to it.
    rho = 0.6
    mean = sum(1 - md1_wait_cdf(i / 20, rho) for i in range(0, 20 * 40)) / 20
    assert mean == pytest.approx(rho / (2 * (1 - rho)), rel=0.03)
    assert md1_wait_cdf(0, rho) == pytest.approx(1 - rho)  # an idle worker: no wait


@pytest.fixture
def slow_server() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "support" / "slowserver.py"), "--service-ms", str(SERVICE_MS_PER_IMAGE)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = proc.stdout.readline().strip() if proc.stdout else ""
        assert url.startswith("http://127.0.0.1:"), f"slow server did not start: {url!r}"
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_capacity_finds_the_known_capacity_of_a_single_worker_server(slow_server: str, tmp_path: Path) -> None:
    service_s = IMAGES_PER_REQUEST * SERVICE_MS_PER_IMAGE / 1000
    expected = analytic_capacity(service_s, P99_MS / 1000)
    assert 35 < expected < 42  # rho ~ 0.77 for a target of 10 service times
    out = tmp_path / "capacity.jsonl"
    result = CliRunner().invoke(app, [
        "bench", "capacity", "--url", slow_server, "--model", "slow", "--p99", f"{P99_MS:g}ms",
        "--images-per-request", str(IMAGES_PER_REQUEST), "--rate-precision", str(PRECISION),
        # Short steps to keep the test bounded (300 requests: 3 beyond the p99; 0.5 s of warm-up), from about
        # half the capacity, so that the bracket is found in two steps.
        "--min-requests", str(STEP_REQUESTS), "--min-seconds", str(STEP_MIN_S), "--max-seconds", str(STEP_MAX_S),
        "--warmup-seconds", "0.5", "--start-rate", "20", "--max-steps", "10", "--price-per-hour", "0.1",
        "--out", str(out), "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    rec = json.loads(result.stdout)
    # Each step says it is in progress before it runs (stderr, one plain line), then its verdict.
    started = re.findall(r"^  step (\d+) of at most 10: (\w+) at ([0-9.]+) req/s for \d+ s", result.stderr, re.M)
    assert [(int(n), phase, float(rate)) for n, phase, rate in started] == [
        (i, s["phase"], pytest.approx(s["rate"], abs=1e-3)) for i, s in enumerate(rec["capacity_steps"], 1)
    ]
    assert json.loads(out.read_text().splitlines()[-1]) == rec
    steps = rec["capacity_steps"]
    capacity, upper = rec["capacity_rate"], rec["capacity_upper_rate"]

    # The search's shape: brackets first, then bisects; the answer is the highest passing rate, the lowest
    # failing rate above it lies within the precision, and every step offered its share of requests.
    phases = [s["phase"] for s in steps]
    assert phases == sorted(phases, key=lambda p: p != "bracket") and "bisect" in phases
    assert capacity == max(s["rate"] for s in steps if s["passed"])
    assert upper == min(s["rate"] for s in steps if not s["passed"] and s["rate"] > capacity)
    assert rec["capacity_converged"] and (upper - capacity) / capacity <= PRECISION + 1e-9
    for s in steps:  # the step rule's seconds; a Poisson count of requests, within 4 sd of rate x seconds
        assert s["seconds"] == pytest.approx(min(max(STEP_REQUESTS / s["rate"], STEP_MIN_S), STEP_MAX_S), rel=1e-4)
        assert s["requests"] >= 0.8 * s["rate"] * s["seconds"]
    at = next(s for s in steps if s["rate"] == capacity)
    assert at["passed"] and at["errors"] == 0 and at["p99_ms"] <= P99_MS
    assert all(s["why"].startswith("p99") for s in steps if not s["passed"])  # latency failed them, not errors

    # Near the formula's answer. Generous below, for a busy shared machine: a stall can only fail a step
    # early (a lower capacity). A search that stopped at its bracket (about half), or ignored the p99 (it
    # doubles until requests are dropped) lands outside; one that returned a failing rate fails above.
    assert 0.6 * expected <= capacity <= 1.12 * expected, (capacity, expected, steps)

    # The headline numbers: images/s and images per dollar at the target, beside the peak.
    assert rec["search"] == "capacity" and rec["mode"] == "open" and rec["rate"] == pytest.approx(capacity, rel=1e-4)
    assert rec["p99_target_ms"] == P99_MS and rec["latency_p99_ms"] == at["p99_ms"]
    assert rec["capacity_images_per_s"] == pytest.approx(IMAGES_PER_REQUEST * rec["requests_per_s"], rel=1e-3)
    assert rec["capacity_images_per_s"] == pytest.approx(IMAGES_PER_REQUEST * capacity, rel=0.2)
    assert rec["capacity_cost_performance_kimg_per_usd"] == pytest.approx(
        rec["capacity_images_per_s"] * 3600 / 0.1 / 1000, rel=1e-3
    )
    assert rec["peak_images_per_s"] >= rec["capacity_images_per_s"]
    # One worker cannot do more than 1 / service requests per second, whatever the latency.
    assert rec["peak_images_per_s"] <= IMAGES_PER_REQUEST / service_s * 1.05
    assert rec["capacity_step_rule"] == {"min_requests": STEP_REQUESTS, "min_seconds": STEP_MIN_S,
                                         "max_seconds": STEP_MAX_S, "warmup_seconds": 0.5}  # fmt: skip


def threshold(limit: float, calls: list[float]):
    def measure(rate: float, phase: str) -> Step:
        calls.append(rate)
        return Step(phase, rate, rate <= limit, "" if rate <= limit else "over")

    return measure


def test_search_doubles_to_a_bracket_then_bisects_to_the_precision() -> None:
    calls: list[float] = []
    steps = search(threshold(37.3, calls), start=5, precision=0.05, max_steps=20)
    assert calls[:4] == [5, 10, 20, 40]  # 40 fails: the bracket is [20, 40]
    assert [s.phase for s in steps] == ["bracket"] * 4 + ["bisect"] * (len(steps) - 4)
    lo = max(s.rate for s in steps if s.passed)
    hi = min(s.rate for s in steps if not s.passed)
    assert lo <= 37.3 < hi and (hi - lo) / lo <= 0.05
    assert len(steps) <= 4 + math.ceil(math.log2(20 / (0.05 * 20))) + 1


def test_search_halves_when_the_start_fails_and_respects_the_ceiling_and_the_step_budget() -> None:
    calls: list[float] = []
    steps = search(threshold(7, calls), start=100, precision=0.05, max_steps=20)
    assert calls[:5] == [100, 50, 25, 12.5, 6.25]
    assert max(s.rate for s in steps if s.passed) == pytest.approx(7, rel=0.05)
    # Never fails below the ceiling: capacity is "at least max_rate", with no failing step.
    steps = search(threshold(1e9, []), start=10, precision=0.05, max_steps=20, max_rate=50)
    assert [s.rate for s in steps] == [10, 20, 40, 50] and all(s.passed for s in steps)
    # Out of steps: the search stops where it is.
    assert len(search(threshold(1e9, []), start=1, precision=0.05, max_steps=6)) == 6
    # Nothing passes: the search halves until its steps run out, or the rate is too low for a p99.
    assert not any(s.passed for s in search(threshold(0, []), start=1, precision=0.05, max_steps=5))
    assert [s.rate for s in search(threshold(0, []), start=8, precision=0.05, max_steps=20, min_rate=1.5)] == [8, 4, 2]


def _result(latencies_ms: list[float], errors: tuple[str, ...] = ()) -> LoadResult:
    spec = LoadSpec(url="http://127.0.0.1:1", mode="open", rate=10, seconds=1)
    samples = [Sample(0.0, 0.0, ms / 1000) for ms in latencies_ms] + [Sample(0.0, 0.0, 0.001, e) for e in errors]
    return LoadResult(spec, started=0.0, samples=samples)


def test_a_step_passes_only_with_p99_within_the_target_and_no_errors() -> None:
    ok = [10.0] * 99 + [90.0]  # nearest-rank p99 of 100 samples: the 99th, 10 ms
    assert judge(_result(ok), 50) == (True, "")
    assert judge(_result([10.0] * 98 + [90.0, 90.0]), 50) == (False, "p99 90.0 ms > 50 ms")
    assert judge(_result(ok, errors=("503",)), 50) == (False, "1 errors {'503': 1}")
    assert judge(_result([], errors=("dropped",)), 50)[0] is False


def test_step_length_rule_and_spec_checks() -> None:
    rule = StepRule(min_requests=1000, min_seconds=10, max_seconds=120, warmup_seconds=3)
    assert rule.seconds(200) == 10  # 1000 requests take 5 s: the floor holds
    assert rule.seconds(50) == 20  # 1000 requests at 50/s
    assert rule.seconds(2) == 120  # capped
    assert rule.min_rate == pytest.approx(100 / 120)  # below it, a capped step has under 100 requests
    load = LoadSpec(url="http://127.0.0.1:1")
    for bad in ({"p99_ms": 0}, {"p99_ms": 100, "precision": 0}, {"p99_ms": 100, "start_rate": -1}):
        with pytest.raises(ValueError):
            CapacitySpec(load, **bad)
    with pytest.raises(ValueError):
        StepRule(min_seconds=10, max_seconds=5)


def test_capacity_cli_names_what_is_missing() -> None:
    result = CliRunner().invoke(app, ["bench", "capacity", "--p99", "100ms"])
    assert result.exit_code == 2 and "--model" in result.output
