"""`saikyo tune`: the fastest accurate way to serve a model on this machine, chosen by measurement.

    stage 1  in process, seconds each: every installed engine x every precision the CPU and the model
             support (fp32; bf16 where the CPU computes it natively; int8 where NAME-int8 is in the
             repository), a few forward passes at a few batch sizes, in interleaved rounds (every
             candidate once per round, each one's median round counts: a slow spell of a shared
             machine spreads over all of them instead of deciding between two engines). Accuracy guard: a precision other
             than fp32 is eligible only if its top-1 agrees with fp32 on the held-out photos (and the
             --calibration-dir images) at least `min_agreement` of the time.
    stage 2  end to end over HTTP, for the front-runners: `saikyo serve` on a loopback port per
             configuration (max batch size, batch delay, OpenVINO streams; then the best in one server
             process per core, `--workers`, which is advised, not tuned: a setting of the whole server),
             the cost lab's capacity search at the user's traffic shape (images per request) and p99
             target. The score is the capacity in images/s; thousand images per dollar beside it.

Stage 1 ranks by the images/s of the forward pass one request makes on its own (its k images): what
a lightly loaded server runs, and what a 1-image request waits for. Whether cross-request batching pays
is stage 2's question, so the front-runners also include the best at large batches.

Everything that measures is injected (`Stage1` and `Stage2` callables), so that the choice is testable
with shaped measurements; `ForwardMeasure` and `measure_served` are the real ones.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

Say = Callable[[str], None]


# ---- what is compared ----
@dataclass(frozen=True)
class Candidate:
    """One way to run the model's network: which file (NAME or NAME-int8), engine and precision."""

    model: str  # the repository name whose file runs
    backend: str  # onnxruntime | openvino
    precision: str  # fp32 | bf16 | int8

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}"

    @property
    def engine_precision(self) -> str:
        """What the engine is asked for; int8 files keep their float layers in fp32 (OpenVINO's bf16
        would change those too)."""
        return "bf16" if self.precision == "bf16" else "fp32"


def load_candidate(entry: Any, settings: Any, candidate: Candidate) -> Any:
    """`candidate`'s runner for `entry` (a local version): the model's effective options, with the
    engine and precision under test in place of whatever its block or a tuning would choose."""
    from saikyo.runtime import create_runner, runner_inputs

    _, options = runner_inputs(entry, settings)
    options = replace(options, backend=candidate.backend, device="cpu", precision=candidate.engine_precision)
    return create_runner(entry, options)


@dataclass(frozen=True)
class Screened:
    """A candidate after stage 1."""

    candidate: Candidate
    seconds: dict[int, float]  # batch size -> seconds per forward pass (median)
    agreement: float | None = None  # top-1 agreement with fp32 (None: fp32 itself)
    error: str | None = None  # why it could not run

    def rate(self, batch: int) -> float:
        t = self.seconds.get(batch)
        return batch / t if t else 0.0

    def summary(self) -> dict[str, Any]:
        return {"model": self.candidate.model, "backend": self.candidate.backend,
                "precision": self.candidate.precision, "agreement": self.agreement, "error": self.error,
                "ms_per_batch": {str(b): round(t * 1000, 3) for b, t in sorted(self.seconds.items())}}  # fmt: skip


def eligible(s: Screened, min_agreement: float) -> bool:
    """It ran, and a precision other than fp32 keeps the answers (the accuracy guard)."""
    if s.error is not None or not s.seconds:
        return False
    return s.candidate.precision == "fp32" or (s.agreement is not None and s.agreement >= min_agreement)


def stage1_score(s: Screened, images_per_request: int, p99_ms: float) -> float:
    """images/s of the forward pass one request makes (its k images); 0 when that pass alone takes more
    than the p99 target (no queueing can make such a configuration meet it)."""
    t = s.seconds.get(images_per_request)
    if not t or t * 1000 > p99_ms:
        return 0.0
    return images_per_request / t


def batch_sizes(images_per_request: int) -> list[int]:
    """The batch sizes stage 1 measures: 1, the request's own k, and a large batch (what a busy
    server's dynamic batching forms)."""
    return sorted({1, images_per_request, max(8, 2 * images_per_request)})


def front_runners(
    screened: Sequence[Screened],
    images_per_request: int,
    p99_ms: float,
    min_agreement: float,
    count: int = 2,
    own: str | None = None,
) -> list[Screened]:
    """The eligible candidates worth stage 2: the best `count` by stage1_score, plus the best at the
    largest batch when it is another (cross-request batching may favour it), plus the best that runs
    the model's `own` file (not its NAME-int8), whose tuning is the one `serve MODEL` applies."""
    ok = [s for s in screened if eligible(s, min_agreement) and stage1_score(s, images_per_request, p99_ms) > 0]
    ranked = sorted(ok, key=lambda s: stage1_score(s, images_per_request, p99_ms), reverse=True)
    chosen = ranked[:count]
    large = max(batch_sizes(images_per_request))
    fits = [s for s in ok if s.seconds.get(large, math.inf) * 1000 <= p99_ms]
    best_large = max(fits, key=lambda s: s.rate(large), default=None)
    if best_large is not None and best_large not in chosen:
        chosen.append(best_large)
    best_own = next((s for s in ranked if s.candidate.model == own), None)
    if best_own is not None and best_own not in chosen:
        chosen.append(best_own)
    return chosen


# ---- stage 2's configurations ----
@dataclass(frozen=True)
class ServeConfig:
    candidate: Candidate
    max_batch_size: int
    max_delay_ms: float
    streams: int = 1
    # Server processes (`--workers`): a setting of the whole server, not of one model, so it is measured
    # and advised but not part of the model's tuning.
    workers: int = 1

    @property
    def label(self) -> str:
        streams = f", {self.streams} streams" if self.streams != 1 else ""
        workers = f", {self.workers} workers" if self.workers != 1 else ""
        return f"{self.candidate.label}, max batch {self.max_batch_size}, delay {self.max_delay_ms:g} ms{streams}{workers}"

    def serving(self) -> dict[str, Any]:
        """The options a tuning sets: a version's `serving` block (models/serving.py)."""
        out: dict[str, Any] = {"backend": self.candidate.backend, "max_batch_size": self.max_batch_size,
                               "max_delay_ms": self.max_delay_ms}  # fmt: skip
        if self.candidate.backend == "openvino":
            out.update(precision=self.candidate.engine_precision, streams=self.streams)
        return out


def configurations(runners: Sequence[Screened], images_per_request: int, cores: int) -> list[ServeConfig]:
    """Stage 2's grid, most promising first and round-robin over the front-runners, so that a budget
    that ends early has covered every front-runner's likeliest configuration."""
    k = images_per_request
    per: list[list[ServeConfig]] = []
    for s in runners:
        c = s.candidate
        grid = [ServeConfig(c, max(16, 2 * k), 0.0), ServeConfig(c, max(16, 2 * k), 2.0), ServeConfig(c, max(8, k), 0.0)]
        if c.backend == "openvino" and cores >= 2:
            grid.insert(1, ServeConfig(c, max(16, 2 * k), 0.0, streams=2))
        grid.append(ServeConfig(c, max(32, 4 * k), 2.0))
        per.append(grid)
    out: list[ServeConfig] = []
    for i in range(max((len(g) for g in per), default=0)):
        out += [g[i] for g in per if i < len(g)]
    return out


@dataclass(frozen=True)
class Served:
    """A configuration after stage 2."""

    config: ServeConfig
    capacity_images_per_s: float | None  # None: no rate met the target
    record: dict[str, Any] = field(default_factory=dict, compare=False)  # the capacity search's record
    seconds: float = 0.0


Stage1 = Callable[[Candidate, list[int]], Screened]
Stage2 = Callable[[ServeConfig, "float | None"], Served]  # (config, a start rate in req/s or None)


@dataclass
class TuneResult:
    model: str
    images_per_request: int
    p99_ms: float
    min_agreement: float
    screened: list[Screened]
    runners: list[Screened]
    served: list[Served]

    def best(self, model: str | None = None, workers: int = 1) -> Served | None:
        """The configuration with the highest capacity (of `model`'s own file when given) among those
        run in `workers` server processes (a tuning is one process's configuration)."""
        passed = [s for s in self.served if s.capacity_images_per_s and s.config.workers == workers
                  and (model is None or s.config.candidate.model == model)]  # fmt: skip
        return max(passed, key=lambda s: s.capacity_images_per_s or 0.0, default=None)

    def with_workers(self) -> Served | None:
        """The configuration measured in several server processes, when one was."""
        return next((s for s in self.served if s.config.workers > 1), None)

    def agreement_of(self, candidate: Candidate) -> float | None:
        return next((s.agreement for s in self.screened if s.candidate == candidate), None)


def tune(
    model: str,
    candidates: Sequence[Candidate],
    stage1: Stage1,
    stage2: Stage2 | None,
    images_per_request: int,
    p99_ms: float,
    budget_s: float,
    min_agreement: float = 0.99,
    cores: int = 1,
    say: Say = lambda _m: None,
    clock: Callable[[], float] = time.monotonic,
    stage1_rounds: int = 3,
) -> TuneResult:
    """Stage 1 on every candidate in `stage1_rounds` interleaved rounds, then stage 2 on the front-runners'
    configurations while the budget lasts (at least one runs). Without `stage2`, stage 1's best stands
    alone (capacity unknown)."""
    started = clock()
    k = images_per_request
    sizes = batch_sizes(k)
    runs: dict[Candidate, list[Screened]] = {c: [] for c in candidates}
    for r in range(1, stage1_rounds + 1):
        for i, c in enumerate(candidates, 1):
            if runs[c] and runs[c][0].error:
                continue  # it could not run: once is enough
            runs[c].append(stage1(c, sizes))
            merged = [median_round(v) for v in runs.values() if v]
            best = max((x for x in merged if eligible(x, min_agreement)), key=lambda x: stage1_score(x, k, p99_ms), default=None)
            say(f"stage 1: round {r} of {stage1_rounds}, {i} of {len(candidates)} {c.model} {c.label}: "
                f"{_stage1_line(median_round(runs[c]), min_agreement)}  | best so far: {_best1(best, k, p99_ms)}")  # fmt: skip
    screened = [median_round(runs[c]) for c in candidates]
    release = getattr(stage1, "close", None)  # ForwardMeasure's runners: stage 2 serves in other processes
    if release is not None:
        release()
    runners = front_runners(screened, k, p99_ms, min_agreement, own=model)
    result = TuneResult(model, k, p99_ms, min_agreement, screened, runners, [])
    if not runners:
        say(f"stage 1: no eligible configuration runs {k} image(s) within p99 <= {p99_ms:g} ms")
        return result
    say("front-runners: " + ", ".join(f"{s.candidate.model} {s.candidate.label}" for s in runners))
    if stage2 is None:
        return result
    # The model's own file first: its tuning is what `serve MODEL` applies, so even the shortest budget
    # measures it; NAME-int8's configurations follow in turn.
    grid = configurations(sorted(runners, key=lambda s: s.candidate.model != model), k, cores)
    spent: list[float] = []
    i = 0
    while i < len(grid):
        config = grid[i]
        i += 1
        left = budget_s - (clock() - started)
        expected = statistics.mean(spent) if spent else 0.0
        if spent and expected > left:
            say(f"stage 2: budget spent after {len(spent)} of {len(grid)} configurations (--budget raises it)")
            break
        best = result.best(workers=config.workers)
        start = 0.8 * best.capacity_images_per_s / k if best and best.capacity_images_per_s else None
        t0 = clock()
        served = stage2(config, start)
        spent.append(clock() - t0)
        result.served.append(served)
        if i == 1 and cores >= 2 and served.capacity_images_per_s:
            # Next, the same in one server process per core: on several cores the lever that is often
            # largest (ONNX Runtime's threads wait at every operator's barrier; processes do not).
            grid.insert(1, replace(config, workers=cores))
        best = result.best()
        got = f"{served.capacity_images_per_s:.1f} img/s" if served.capacity_images_per_s else "no rate met the target"
        shown = f"{best.config.candidate.model} {best.config.label}: {best.capacity_images_per_s:.1f} img/s" if best else "-"
        say(f"stage 2: {i} of {len(grid)} {config.candidate.model} {config.label}: {got}  | best so far: {shown}")
    return result


def median_round(runs: Sequence[Screened]) -> Screened:
    """One candidate's rounds as one: per batch size the median of the rounds' times (the first round's
    agreement: the answers do not change between rounds)."""
    first = runs[0]
    if first.error is not None:
        return first
    return replace(first, seconds={b: statistics.median(r.seconds[b] for r in runs) for b in first.seconds})


def _stage1_line(s: Screened, min_agreement: float) -> str:
    if s.error:
        return f"skipped ({s.error})"
    times = ", ".join(f"batch {b} {t * 1000:.1f} ms" for b, t in sorted(s.seconds.items()))
    agreed = "" if s.agreement is None else f", top-1 agreement {s.agreement:.1%}"
    guard = "" if eligible(s, min_agreement) else f" -> not eligible (below {min_agreement:.1%})"
    return times + agreed + guard


def _best1(best: Screened | None, k: int, p99_ms: float) -> str:
    if best is None:
        return "-"
    return f"{best.candidate.model} {best.candidate.label} {stage1_score(best, k, p99_ms):.1f} img/s at batch {k}"


# ---- the real measurements ----
def candidates_for(name: str, has: Callable[[str], bool], openvino: bool, bf16: bool) -> list[Candidate]:
    """Every engine x precision this machine and repository allow for `name`."""
    from saikyo.models import zoo

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    engines = ["onnxruntime"] + (["openvino"] if openvino and x86 else [])
    own = zoo.precision_of(name)  # NAME-int8 tuned by its own name runs int8
    out = [Candidate(name, e, own) for e in engines]
    if "openvino" in engines and bf16 and own == "fp32":
        out.append(Candidate(name, "openvino", "bf16"))
    if zoo.split_variant(name)[1] is None:
        int8 = zoo.variant_name(name, "int8")
        if has(int8):
            out += [Candidate(int8, e, "int8") for e in engines]
    return out


class ForwardMeasure:
    """Stage 1 for real: each candidate's runner, loaded on its first round and kept for the next ones, times
    forward passes of held-out photos at each batch size (median of up to `seconds_per_size` worth a round)
    and compares its top-1 with fp32's (`reference`) once. `close()` releases the runners."""

    def __init__(self, entries: Callable[[str], Any], base_settings: Any, pixels: np.ndarray,
                 reference: Callable[[], np.ndarray], seconds_per_size: float = 0.4) -> None:  # fmt: skip
        self.entries, self.base_settings, self.pixels = entries, base_settings, pixels
        self.reference, self.seconds_per_size = reference, seconds_per_size
        self.runners: dict[Candidate, Any] = {}
        self.agreements: dict[Candidate, float | None] = {}

    def __call__(self, c: Candidate, sizes: list[int]) -> Screened:
        from saikyo.models.errors import ModelNotExported, RepositoryError
        from saikyo.runtime import RunnerError

        if c not in self.runners:
            try:
                self.runners[c] = load_candidate(self.entries(c.model), self.base_settings, c)
            except (RunnerError, RepositoryError, ModelNotExported, OSError, ValueError) as exc:
                return Screened(c, {}, error=str(exc).splitlines()[0][:200])
        runner = self.runners[c]
        timings = {}
        for b in sizes:
            batch = np.resize(self.pixels, (b, *self.pixels.shape[1:]))
            runner.infer_pixels(batch)  # warm-up: first-run allocations, caches another candidate evicted
            runs: list[float] = []
            deadline = time.perf_counter() + self.seconds_per_size
            while len(runs) < 3 or (time.perf_counter() < deadline and len(runs) < 50):
                t0 = time.perf_counter()
                runner.infer_pixels(batch)
                runs.append(time.perf_counter() - t0)
            timings[b] = statistics.median(runs)
        if c not in self.agreements:
            self.agreements[c] = None
            if c.precision != "fp32":
                px = self.pixels
                mine = np.concatenate([runner.infer_pixels(px[i : i + 8]) for i in range(0, len(px), 8)])
                self.agreements[c] = float(np.mean(mine.argmax(1) == self.reference().argmax(1)))
        return Screened(c, timings, self.agreements[c])

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()
        self.runners.clear()


def agreement_pixels(preprocessing: Any, extra_images: Sequence[Path] = ()) -> np.ndarray:
    """The photos precisions are compared on, as network pixels: the held-out photos quantisation never
    calibrated on (models/quantize.py), the given images (an imported model's own), each with its mirror."""
    from saikyo.inference import imaging
    from saikyo.models.quantize import held_out_pixels

    _, pixels = held_out_pixels(preprocessing)
    extra = [imaging.decode(Path(p).read_bytes(), preprocessing) for p in extra_images]
    if extra:
        pixels = np.concatenate([pixels, np.stack(extra)])
    return np.concatenate([pixels, pixels[:, :, ::-1]])


def measure_served(
    entries: Callable[[str], Any],
    work_dir: Path,
    images: Sequence[tuple[str, bytes]],
    images_per_request: int,
    p99_ms: float,
    context: Callable[[ServeConfig], Any],
) -> Stage2:
    """Stage 2 for real: `saikyo serve` with the configuration as the version's own `serving` block (the
    very mechanism a tuning takes effect by, and above any flag), from a scratch repository that links
    the model's file, then the cost lab's capacity search with short steps (a tuning compares
    configurations; `bench capacity` gives the long answer)."""
    from saikyo.bench import records
    from saikyo.bench.capacity import CapacitySpec, StepRule, run_capacity
    from saikyo.bench.load import LoadError, LoadSpec
    from saikyo.bench.localserver import ServerStartError, local_server

    rule = StepRule(min_requests=200, min_seconds=2.0, max_seconds=6.0, warmup_seconds=1.0)
    served = 0

    def run(config: ServeConfig, start_rate: float | None) -> Served:
        nonlocal served
        served += 1
        t0 = time.monotonic()
        model = config.candidate.model
        root = work_dir / f"config-{served}"
        scratch(root, model, entries(model), config.serving())
        try:
            args = ["--device", "cpu", "--no-tuning", "--workers", str(config.workers)]
            with local_server(root, model, work_dir, args, timeout=300) as server:
                load = LoadSpec(url=server.url, model=model, images_per_request=images_per_request, timeout=30)
                spec = CapacitySpec(load, p99_ms, precision=0.1, start_rate=start_rate, max_steps=7, rule=rule)
                found = run_capacity(spec, images)
        except (LoadError, ServerStartError) as exc:
            return Served(config, None, {"error": str(exc).splitlines()[0][:300]}, time.monotonic() - t0)
        record = records.capacity_record(found, context(config)) if found.steps else {}
        return Served(config, record.get("capacity_images_per_s"), record, time.monotonic() - t0)

    return run


def scratch(root: Path, model: str, entry: Any, serving: dict[str, Any]) -> None:
    """A one-version repository at `root`: `entry`'s model file linked, its meta.json with `serving`."""
    import json

    d = root / model
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.onnx").symlink_to(entry.path.resolve())
    (d / "meta.json").write_text(json.dumps({**entry.meta, "serving": serving}))
