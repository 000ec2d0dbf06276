"""Capacity at a latency target: the highest Poisson request rate whose p99 stays under a budget.

As MLPerf's server scenario and perf_analyzer do: each step is an open-loop run (saikyo.bench.load,
Poisson arrivals, latency from each request's *scheduled* send time) at one offered rate, judged
pass (p99 <= target and no errors of any kind, `dropped` included) or fail. The search

    bracket  from a start rate, double while a step passes (halve while it fails, down to a rate that
             still gives a step 100 requests) until one passes and one fails: lo passes, hi fails;
    bisect   run the midpoint, keep the half that still has a pass below and a fail above, until
             hi - lo <= precision x lo (5% by default).

The capacity is lo, the highest rate that passed; the lowest failing rate above it is kept beside it.

How long a step runs, and why: p99 of n samples is the sample at rank ceil(0.99 n), so it rests on the
n - ceil(0.99 n) samples beyond it. A step offers enough requests that at least ~10 lie beyond
(`min_requests` 1000 by default), for at least `min_seconds` (10 s: several times a loaded queue's
relaxation time, and long enough to catch periodic stalls), capped at `max_seconds` (120 s: a search
ends in bounded time; a capped step says how many samples its p99 rests on). Before that, `warmup_seconds`
(3 s) of the same Poisson load are sent and not measured: connections open, and the queue reaches the
state the rate gives it instead of starting empty, which would flatter the p99. A step ends when every
request it sent has been answered (or has timed out), so steps do not overlap; each starts with one
sequential request, which also proves the server still answers.

p99 near capacity is a noisy statistic, so the search assumes pass/fail is monotone in the rate and
reports what it saw: every step (rate, duration, requests, errors, p99, images/s, verdict) goes into
the record, with the resolution reached.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from saikyo.bench.load import LoadError, LoadResult, LoadSpec, run_load

PERCENTILE = 99.0


@dataclass(frozen=True)
class StepRule:
    """How long each step runs (see the module docstring for why)."""

    min_requests: int = 1000
    min_seconds: float = 10.0
    max_seconds: float = 120.0
    warmup_seconds: float = 3.0

    def __post_init__(self) -> None:
        if self.min_requests < 1 or self.min_seconds <= 0 or self.warmup_seconds < 0:
            raise ValueError("step rule: min requests >= 1, min seconds > 0, warm-up seconds >= 0")
        if self.max_seconds < self.min_seconds:
            raise ValueError(f"max seconds ({self.max_seconds:g}) is below min seconds ({self.min_seconds:g})")

    @property
    def min_rate(self) -> float:
        """The lowest rate worth a step: 100 requests in max_seconds (a p99 from 1 sample beyond it)."""
        return 100 / self.max_seconds

    def seconds(self, rate: float) -> float:
        """Measured seconds at `rate` requests/s: min_requests / rate, within [min_seconds, max_seconds]."""
        return min(max(self.min_requests / rate, self.min_seconds), self.max_seconds)

    def to_dict(self) -> dict[str, Any]:
        return {"min_requests": self.min_requests, "min_seconds": self.min_seconds,
                "max_seconds": self.max_seconds, "warmup_seconds": self.warmup_seconds}  # fmt: skip


@dataclass(frozen=True)
class CapacitySpec:
    """One search: the server, the model, the request shape, the target and the search's knobs."""

    load: LoadSpec  # url, model, images per request, timeout, api key...; mode/rate/seconds are set per step
    p99_ms: float
    precision: float = 0.05  # stop when (hi - lo) / lo <= this
    start_rate: float | None = None  # None: half the rate one sequential client reaches
    max_rate: float | None = None  # never offer more than this
    max_steps: int = 20
    rule: StepRule = field(default_factory=StepRule)

    def __post_init__(self) -> None:
        if self.p99_ms <= 0:
            raise ValueError("the p99 target must be positive")
        if not 0 < self.precision < 1:
            raise ValueError(f"precision is a fraction of the rate in (0, 1), not {self.precision}")
        if self.start_rate is not None and self.start_rate <= 0:
            raise ValueError("the start rate must be positive")
        if self.max_rate is not None and self.max_rate <= 0:
            raise ValueError("the max rate must be positive")
        if self.max_steps < 2:
            raise ValueError("a search needs at least 2 steps")


@dataclass(frozen=True)
class Step:
    phase: str  # "bracket" | "bisect"
    rate: float  # offered requests/s
    passed: bool
    why: str = ""  # what failed it: "p99 123.4 ms > 100 ms", "3 errors {'503': 3}", "no answers"
    result: LoadResult | None = field(default=None, compare=False, repr=False)

    def summary(self) -> dict[str, Any]:
        """The step as the record keeps it."""
        out: dict[str, Any] = {"phase": self.phase, "rate": round(self.rate, 3), "passed": self.passed,
                               "why": self.why}  # fmt: skip
        r = self.result
        if r is not None:
            lat = r.latency()
            n = len(r.samples)
            out.update(
                seconds=r.spec.seconds,
                requests=n,
                errors=n - len(r.ok),
                p99_ms=round(lat.p99, 3) if lat else None,
                # how many samples lie beyond the nearest-rank p99: what the percentile rests on
                beyond_p99=(lat.count - math.ceil(PERCENTILE / 100 * lat.count)) if lat else 0,
                images_per_s=round(r.images_per_s(), 3),
            )
        return out


@dataclass(frozen=True)
class CapacityResult:
    spec: CapacitySpec
    steps: tuple[Step, ...]

    @property
    def capacity(self) -> Step | None:
        """The highest passing step."""
        return max((s for s in self.steps if s.passed), key=lambda s: s.rate, default=None)

    @property
    def upper(self) -> Step | None:
        """The lowest failing step above the capacity (None: no step failed above it)."""
        floor = self.capacity.rate if self.capacity else 0.0
        return min((s for s in self.steps if not s.passed and s.rate > floor), key=lambda s: s.rate, default=None)

    @property
    def resolution(self) -> float | None:
        """(lowest failing rate - capacity) / capacity: how close the search came."""
        if self.capacity is None or self.upper is None:
            return None
        return (self.upper.rate - self.capacity.rate) / self.capacity.rate

    @property
    def converged(self) -> bool:
        return self.resolution is not None and self.resolution <= self.spec.precision + 1e-12

    @property
    def peak(self) -> Step | None:
        """The step with the most images/s, whatever its latency: the server's peak throughput."""
        measured = [s for s in self.steps if s.result is not None and s.result.ok]
        return max(measured, key=lambda s: s.result.images_per_s(), default=None)  # type: ignore[union-attr]


Measure = Callable[[float, str], Step]  # (rate, phase) -> the judged step
Say = Callable[[str], None]


def search(
    measure: Measure,
    start: float,
    precision: float,
    max_steps: int,
    max_rate: float | None = None,
    min_rate: float = 0.0,
) -> list[Step]:
    """Bracket, then bisect (module docstring). Pure: `measure` runs and judges one step. Going down, it
    stops above `min_rate`: below it a step offers too few requests for a p99 to mean anything."""
    steps: list[Step] = []

    def run(rate: float, phase: str) -> Step:
        step = measure(rate, phase)
        steps.append(step)
        return step

    rate = min(start, max_rate) if max_rate else start
    first = run(rate, "bracket")
    lo: float | None = rate if first.passed else None
    hi: float | None = None if first.passed else rate
    while len(steps) < max_steps:
        if hi is None:  # going up: double until a step fails, or the ceiling passes
            assert lo is not None
            if max_rate is not None and lo >= max_rate:
                break
            rate = min(lo * 2, max_rate) if max_rate else lo * 2
            step = run(rate, "bracket")
            lo, hi = (rate, None) if step.passed else (lo, rate)
        elif lo is None:  # going down: halve until a step passes
            if hi / 2 < min_rate:
                break
            rate = hi / 2
            step = run(rate, "bracket")
            lo, hi = (rate, hi) if step.passed else (None, rate)
        else:
            if hi - lo <= precision * lo:
                break
            rate = (lo + hi) / 2
            step = run(rate, "bisect")
            lo, hi = (rate, hi) if step.passed else (lo, rate)
    return steps


def judge(result: LoadResult, p99_ms: float) -> tuple[bool, str]:
    """Pass: every offered request answered 200 with one prediction per image, and p99 within the target."""
    errors = len(result.samples) - len(result.ok)
    if errors:
        return False, f"{errors} errors {result.errors_by_kind()}"
    lat = result.latency()
    if lat is None:
        return False, "no answers"
    if lat.p99 > p99_ms:
        return False, f"p99 {lat.p99:.1f} ms > {p99_ms:g} ms"
    return True, ""


def step_spec(spec: CapacitySpec, rate: float, index: int) -> LoadSpec:
    """The open-loop run of one step; each step its own arrival schedule (seed + index)."""
    return replace(
        spec.load,
        mode="open",
        rate=rate,
        seconds=spec.rule.seconds(rate),
        warmup_seconds=spec.rule.warmup_seconds,
        warmup=1,  # one sequential request first: the server still answers
        seed=spec.load.seed + index,
        schedule=None,
    )


def estimate_start_rate(spec: CapacitySpec, images: Sequence[tuple[str, bytes]] | None) -> float:
    """Half the rate one sequential client reaches (5 requests after a warm-up): a rate that usually
    passes, so that the bracket goes up by doubling."""
    probe = replace(spec.load, mode="seed", requests=5, warmup=1, schedule=None)
    result = asyncio.run(run_load(probe, images))
    lat = result.latency()
    if lat is None:
        raise LoadError(f"the server answered none of 5 sequential requests: {result.errors_by_kind()}")
    return 0.5 * 1000.0 / max(lat.mean, 0.1)


def run_capacity(
    spec: CapacitySpec, images: Sequence[tuple[str, bytes]] | None = None, say: Say = lambda _m: None
) -> CapacityResult:
    """Search `spec`'s capacity against its server; `say` hears about every step."""
    start = spec.start_rate or estimate_start_rate(spec, images)
    say(f"capacity of {spec.load.model or 'the default model'} at p99 <= {spec.p99_ms:g} ms, "
        f"{spec.load.images_per_request} image(s) per request; from {start:.3g} req/s, precision {spec.precision:.0%}; "
        f"steps of >= {spec.rule.min_requests} requests, {spec.rule.min_seconds:g}-{spec.rule.max_seconds:g} s "
        f"after {spec.rule.warmup_seconds:g} s of warm-up")  # fmt: skip

    def measure(rate: float, phase: str) -> Step:
        load = step_spec(spec, rate, index=len(taken))
        # The step in progress: a step lasts up to minutes, and its verdict line comes only at its end.
        say(f"  step {len(taken) + 1} of at most {spec.max_steps}: {phase} at {rate:.3f} req/s for "
            f"{load.warmup_seconds + load.seconds:.0f} s ({load.warmup_seconds:g} s warm-up) ...")  # fmt: skip
        result = asyncio.run(run_load(load, images))
        passed, why = judge(result, spec.p99_ms)
        step = Step(phase, rate, passed, why, result)
        taken.append(step)
        s = step.summary()
        say(f"  {phase:7} {rate:9.3f} req/s  {s['seconds']:5.1f} s  {s['requests']:5} requests  "
            f"p99 {s['p99_ms'] if s['p99_ms'] is not None else '-'} ms  {s['images_per_s']} img/s  "
            f"{'pass' if passed else 'FAIL: ' + why}")  # fmt: skip
        return step

    taken: list[Step] = []
    steps = search(measure, start, spec.precision, spec.max_steps, spec.max_rate, spec.rule.min_rate)
    return CapacityResult(spec, tuple(steps))
