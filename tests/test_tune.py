"""`saikyo tune`: the search's choice on shaped measurements, the accuracy guard, tunings stored beside the
versions (local and s3://) and applied by a real server on a matching CPU only."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from support.serverproc import running_server
from support.tinymodel import add_tiny_int8_model, add_tiny_model

from saikyo.bench.tune import (
    Candidate,
    ForwardMeasure,
    Screened,
    ServeConfig,
    Served,
    agreement_pixels,
    eligible,
    front_runners,
    load_candidate,
    tune,
)
from saikyo.inference.preprocessing import Preprocessing
from saikyo.models import tunings
from saikyo.models.errors import RepositoryError
from saikyo.models.repository import ModelRepository
from saikyo.runtime import openvino_installed
from saikyo.runtime.cpu import this_cpu
from saikyo.settings import Settings


class ShapedRunner:
    """A fake runner whose forward pass takes `ms[batch]`: what stage 1 would measure of it."""

    def __init__(self, candidate: Candidate, ms: dict[int, float], agreement: float | None = None) -> None:
        self.candidate, self.ms, self.agreement = candidate, ms, agreement

    def screened(self, sizes: list[int]) -> Screened:
        return Screened(self.candidate, {b: self.ms[b] / 1000 for b in sizes}, self.agreement)


# One fast on a lone image, the other fast on a full batch: the traffic shape must decide.
SMALL = ShapedRunner(Candidate("m", "onnxruntime", "fp32"), {1: 1.0, 2: 2.0, 8: 16.0, 16: 32.0})
LARGE = ShapedRunner(Candidate("m", "openvino", "fp32"), {1: 10.0, 2: 10.0, 8: 4.0, 16: 8.0})


def stage1_of(*runners: ShapedRunner):
    by = {r.candidate: r for r in runners}
    return lambda c, sizes: by[c].screened(sizes)


def stage2_of(*runners: ShapedRunner, k: int):
    """A served configuration's capacity as the shaped forward pass at the request's own batch gives it."""
    by = {r.candidate: r for r in runners}
    return lambda config, _start: Served(config, k / by[config.candidate].ms[k] * 1000 * 0.5, {"capacity_images_per_s": 1.0})


@pytest.mark.parametrize(("k", "winner"), [(1, SMALL), (8, LARGE)])
def test_the_search_picks_the_runner_shaped_for_the_traffic(k: int, winner: ShapedRunner) -> None:
    runners = (SMALL, LARGE)
    candidates = [r.candidate for r in runners]
    alone = tune("m", candidates, stage1_of(*runners), None, images_per_request=k, p99_ms=100, budget_s=60)
    assert alone.runners[0].candidate == winner.candidate  # stage 1's ranking
    full = tune("m", candidates, stage1_of(*runners), stage2_of(*runners, k=k), images_per_request=k, p99_ms=100, budget_s=60)
    best = full.best("m")
    assert best is not None and best.config.candidate == winner.candidate
    assert {s.config.candidate for s in full.served} == set(candidates)  # both were served in stage 2


def test_a_slow_spell_during_one_measurement_does_not_decide_between_close_engines() -> None:
    """Two engines within 20% of each other; the machine is busy while the faster one is first measured
    (its pass takes twice as long). One round of stage 1 picks the slower engine; interleaved rounds, each
    candidate's median round counting, pick the faster."""
    fast = ShapedRunner(Candidate("m", "onnxruntime", "fp32"), {1: 1.0, 2: 2.0, 8: 8.0, 16: 16.0})
    close = ShapedRunner(Candidate("m", "openvino", "fp32"), {1: 1.2, 2: 2.4, 8: 9.6, 16: 19.2})
    calls: list[Candidate] = []

    def stage1(c: Candidate, sizes: list[int]) -> Screened:
        calls.append(c)
        s = {fast.candidate: fast, close.candidate: close}[c].screened(sizes)
        return replace(s, seconds={b: t * 2 for b, t in s.seconds.items()}) if len(calls) == 1 else s

    candidates = [fast.candidate, close.candidate]
    one = tune("m", candidates, stage1, None, images_per_request=8, p99_ms=100, budget_s=60, stage1_rounds=1)
    assert one.runners[0].candidate == close.candidate  # the slow spell decided
    calls.clear()
    three = tune("m", candidates, stage1, None, images_per_request=8, p99_ms=100, budget_s=60)
    assert calls == candidates * 3  # round-robin, not one candidate's rounds back to back
    assert three.runners[0].candidate == fast.candidate
    assert three.screened[0].seconds[8] == pytest.approx(0.008)  # its median round


def test_workers_are_measured_after_the_first_configuration_and_kept_out_of_the_tuning() -> None:
    runners = (SMALL, LARGE)

    def stage2(config: ServeConfig, _start: float | None) -> Served:
        return Served(config, 1000.0 * config.workers if config.candidate == SMALL.candidate else 10.0, {})

    result = tune("m", [r.candidate for r in runners], stage1_of(*runners), stage2, 1, 100, 600, cores=2)
    assert result.served[1].config.workers == 2 and result.served[1].config.candidate == result.served[0].config.candidate
    assert sum(s.config.workers == 2 for s in result.served) == 1
    assert result.best("m").config.workers == 1  # type: ignore[union-attr]  # a tuning is one process's
    assert result.with_workers() is result.served[1]


def test_a_forward_pass_beyond_the_p99_target_is_not_a_front_runner() -> None:
    # At 8 images per request SMALL's pass takes 16 ms: over a 12 ms target, whatever its speed elsewhere.
    runners = front_runners([SMALL.screened([1, 8, 16]), LARGE.screened([1, 8, 16])], 8, 12.0, 0.99)
    assert [s.candidate for s in runners] == [LARGE.candidate]


def test_an_int8_variant_below_the_agreement_threshold_is_never_chosen_even_when_faster() -> None:
    fp32 = ShapedRunner(Candidate("m", "onnxruntime", "fp32"), {1: 5.0, 8: 20.0, 16: 40.0})
    int8 = ShapedRunner(Candidate("m-int8", "onnxruntime", "int8"), {1: 1.0, 8: 4.0, 16: 8.0}, agreement=0.98)
    ok = ShapedRunner(Candidate("m-int8", "openvino", "int8"), {1: 2.0, 8: 8.0, 16: 16.0}, agreement=1.0)
    runners = (fp32, int8, ok)

    def stage2(config: ServeConfig, _start: float | None) -> Served:
        assert config.candidate != int8.candidate, "stage 2 served an int8 variant the guard refused"
        return Served(config, 1000 / {fp32.candidate: 5.0, ok.candidate: 2.0}[config.candidate], {})

    result = tune("m", [r.candidate for r in runners], stage1_of(*runners), stage2, 1, 100, 60, min_agreement=0.99)
    # The fp32 file is the slowest, yet a front-runner: `serve m` applies m's own tuning.
    assert [s.candidate for s in result.runners] == [ok.candidate, fp32.candidate]
    assert result.best() is not None and result.best().config.candidate == ok.candidate  # type: ignore[union-attr]
    assert result.best("m").config.candidate == fp32.candidate  # type: ignore[union-attr]
    # With a threshold it meets, the same variant is eligible.
    assert eligible(int8.screened([1]), 0.95)


def test_stage1_measures_real_runners_and_the_guard_refuses_the_tiny_int8(tmp_path: Path) -> None:
    """The tiny int8 file (calibrated on noise) disagrees with fp32 on the held-out photos: measured, not assumed."""
    repo = ModelRepository(tmp_path / "repo")
    add_tiny_model(repo, "tiny")
    add_tiny_int8_model(repo, "tiny-int8")
    settings = Settings(repository=str(repo.root))
    pre = Preprocessing.from_dict(repo.get("tiny").meta["preprocessing"])
    pixels = agreement_pixels(pre)
    # An imported model's own photos (--calibration-dir) join the held-out ones, each with its mirror.
    assert len(agreement_pixels(pre, [Path(__file__).parent / "data" / "cat.jpg"])) == len(pixels) + 2
    fp32 = load_candidate(repo.get("tiny"), settings, Candidate("tiny", "onnxruntime", "fp32"))
    reference = fp32.infer_pixels(pixels)
    fp32.close()
    measure = ForwardMeasure(repo.get, settings, pixels, lambda: reference, seconds_per_size=0.05)
    same = measure(Candidate("tiny", "onnxruntime", "fp32"), [1, 2])
    int8 = measure(Candidate("tiny-int8", "onnxruntime", "int8"), [1, 2])
    assert set(same.seconds) == {1, 2} and same.agreement is None and eligible(same, 0.99)
    assert int8.agreement is not None and int8.agreement < 0.99 and not eligible(int8, 0.99)
    missing = measure(Candidate("absent", "onnxruntime", "fp32"), [1])
    assert missing.error and not eligible(missing, 0.99)
    again = measure(Candidate("tiny-int8", "onnxruntime", "int8"), [1, 2])  # a second round: the same runner
    assert again.agreement == int8.agreement and len(measure.runners) == 2
    measure.close()
    assert not measure.runners


# ---- tunings: the file, the repository, the server ----
def a_tuning(model: str, cpu_model: str, cores: int, **serving: object) -> tunings.Tuning:
    return tunings.Tuning(model=model, cpu_model=cpu_model, cores=cores, tuned_at="2026-12-01T10:00:00+00:00",
                          serving=dict(serving), images_per_request=8, p99_ms=100.0, capacity_images_per_s=123.4)  # fmt: skip


def test_a_tuning_round_trips_and_hostile_files_are_refused() -> None:
    t = a_tuning("tiny", "Some CPU", 4, backend="openvino", precision="fp32", max_batch_size=8, max_delay_ms=2, streams=2)
    assert tunings.Tuning.from_json(t.to_json(), "t") == tunings.Tuning(**{**t.__dict__, "serving": {**t.serving, "max_delay_ms": 2.0}})
    good = json.loads(t.to_json())
    for bad, why in [
        ({**good, "serving": {"max_batch_size": 10**9}}, "max_batch_size: input should be less than"),
        ({**good, "serving": {"max_batch_size": "8"}}, "max_batch_size: input should be a valid integer"),
        ({**good, "serving": {"workers": 2}}, "unknown key 'workers'"),
        ({**good, "serving": {"backend": "tensorrt"}}, "backend: input should be"),
        ({**good, "cores": True}, "'cores'"),
        ({**good, "schema": "other"}, "not a tuning"),
    ]:
        with pytest.raises(RepositoryError, match=why):
            tunings.Tuning.from_json(json.dumps(bad).encode(), "t")
    with pytest.raises(RepositoryError, match="over"):
        tunings.Tuning.from_json(b" " * (tunings.MAX_TUNING_BYTES + 1), "t")
    assert tunings.cpu_slug("Intel(R) Xeon(R) Platinum 8488C", 4) == "intel-r-xeon-r-platinum-8488c-4core"


def test_tunings_live_beside_the_versions_and_listings_ignore_them(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    add_tiny_model(repo, "tiny")
    mine, other = this_cpu(), a_tuning("tiny", "Other CPU 9000", 96, backend="onnxruntime")
    repo.write_tuning("tiny", tunings.file_name(other.cpu_model, other.cores), other.to_json())
    assert repo.versions("tiny") == [1] and repo.names() == ["tiny"]
    found = tunings.find(repo, "tiny", mine.model, mine.cores)
    assert found.tuning is None and found.others == ("other-cpu-9000-96core.json",)
    t = a_tuning("tiny", mine.model, mine.cores, backend="onnxruntime", max_batch_size=4)
    repo.write_tuning("tiny", tunings.file_name(mine.model, mine.cores), t.to_json())
    assert tunings.find(repo, "tiny", mine.model, mine.cores).tuning == t
    assert repo.versions("tiny") == [1]
    (tmp_path / "tiny" / "tunings" / tunings.file_name(mine.model, mine.cores)).write_text("{")
    broken = tunings.find(repo, "tiny", mine.model, mine.cores)
    assert broken.tuning is None and "not JSON" in (broken.problem or "")


def test_s3_tunings_live_beside_the_versions(s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from support.s3server import BUCKET

    from saikyo.models.cache import ModelCache
    from saikyo.models.s3 import S3Repository

    for key, value in s3_server.env().items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    local = ModelRepository(tmp_path / "local")
    entry = add_tiny_model(local, "tiny")
    repo = S3Repository(f"s3://{BUCKET}/tune", s3_server.url, ModelCache(tmp_path / "cache", 1 << 30))
    repo.publish("tiny", [entry.path], entry.meta)
    t = a_tuning("tiny", "Other CPU", 2, backend="onnxruntime", max_batch_size=4)
    repo.write_tuning("tiny", tunings.file_name("Other CPU", 2), t.to_json())
    assert repo.versions("tiny") == [1] and repo.names() == ["tiny"]
    assert tunings.find(repo, "tiny", "Other CPU", 2).tuning == t
    assert tunings.find(repo, "tiny", "Mine", 2).others == ("other-cpu-2core.json",)


@pytest.fixture(scope="module")
def tuned_repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    """tiny: a serving block, and a tuning for this CPU over it; tiny2: tuned for another CPU only."""
    repo = ModelRepository(tmp_path_factory.mktemp("tuned"))
    add_tiny_model(repo, "tiny")
    repo.configure("tiny", {"max_batch_size": 8, "max_delay_ms": 3.0})
    add_tiny_model(repo, "tiny2", input_size=48, seed=1)
    cpu = this_cpu()
    serving = {"backend": TUNED_BACKEND, "max_batch_size": 4}
    repo.write_tuning("tiny", tunings.file_name(cpu.model, cpu.cores), a_tuning("tiny", cpu.model, cpu.cores, **serving).to_json())
    repo.write_tuning("tiny2", tunings.file_name("Other CPU 9000", 96), a_tuning("tiny2", "Other CPU 9000", 96, **serving).to_json())
    return repo


# What the static rule would not choose here for a fp32 file on a CPU without native bf16.
TUNED_BACKEND = "openvino" if openvino_installed() else "onnxruntime"


def test_serve_applies_a_matching_tuning_and_ignores_another_cpus_with_a_log_line(
    tuned_repository: ModelRepository, tmp_path: Path
) -> None:
    # --max-batch-size is given, and --backend: the tuning for this CPU wins over both, and over the
    # model's own serving block; what it leaves unset comes from the block.
    with running_server(tuned_repository.root, "tiny,tiny2", tmp_path, "--backend", "auto", "--max-batch-size", "12") as server:
        tiny = httpx.get(f"{server.url}/v2/models/tiny").json()
        tiny2 = httpx.get(f"{server.url}/v2/models/tiny2").json()
        log = server.log()
    cpu = this_cpu()
    line = tiny["parameters"]["tuning"]
    assert line.startswith(f"tuned on {cpu.model} ({cpu.cores} cores) at 2026-12-01: {TUNED_BACKEND} fp32, max batch 4")
    assert "123.4 img/s at p99 <= 100 ms" in line and f"model tiny: {line}" in log
    assert tiny["parameters"]["backend"] == TUNED_BACKEND
    assert tiny["serving"]["max_batch_size"] == {"value": 4, "source": "tuning"}
    assert tiny["serving"]["backend"] == {"value": TUNED_BACKEND, "source": "tuning"}
    assert tiny["serving"]["max_delay_ms"] == {"value": 3.0, "source": "model"}
    assert tiny2["parameters"]["tuning"].startswith("untuned: the static rule chose ")
    assert tiny2["serving"]["max_batch_size"] == {"value": 12, "source": "flag"}
    assert "model tiny2: tuning(s) for other CPUs ignored (other-cpu-9000-96core.json)" in log
    assert "by the static rule, not a measurement" in log


def test_no_tuning_serves_the_models_block_and_the_settings(tuned_repository: ModelRepository, tmp_path: Path) -> None:
    with running_server(tuned_repository.root, "tiny", tmp_path, "--backend", "auto", "--no-tuning") as server:
        tiny = httpx.get(f"{server.url}/v2/models/tiny").json()
    assert tiny["parameters"]["tuning"].startswith("untuned (--no-tuning): the static rule chose ")
    assert tiny["serving"]["max_batch_size"] == {"value": 8, "source": "model"}
    assert tiny["serving"]["backend"]["source"] == "default"


@pytest.mark.slow
def test_saikyo_tune_end_to_end_writes_a_tuning_and_benchmark_records(tmp_path: Path) -> None:
    """The real command on the tiny model: stage 1 in process, stage 2 over HTTP, a tuning serve can read."""
    import subprocess
    import sys

    from saikyo.bench import records

    repo = ModelRepository(tmp_path / "repo")
    add_tiny_model(repo, "tiny")
    out = tmp_path / "tune.jsonl"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("SAIKYO_")}
    done = subprocess.run(
        [sys.executable, "-m", "saikyo", "tune", "tiny", "--repository", str(repo.root), "--budget", "10",
         "--p99", "5000ms", "--out", str(out), "--no-quantize"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stage 1: round 3 of 3, 1 of " in done.stderr and "stage 2: 1 of " in done.stderr and "best so far" in done.stderr
    cpu = this_cpu()
    tuning = tunings.find(repo, "tiny", cpu.model, cpu.cores).tuning
    assert tuning is not None and tuning.capacity_images_per_s > 0 and tuning.p99_ms == 5000
    assert "tiny: tuned on " in done.stdout
    recs = records.read(out)
    assert recs and sum(r["tune_chosen"] for r in recs) == 1
    chosen = next(r for r in recs if r["tune_chosen"])
    assert chosen["capacity_images_per_s"] == pytest.approx(tuning.capacity_images_per_s, rel=1e-3)
    assert chosen["tune_config"] == tuning.serving and chosen["tune_stage1"]
