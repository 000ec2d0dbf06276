"""The sweep on tiny generated models: local servers per setting, records per cell, resume."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.paths import ROOT

from saikyo.bench import records
from saikyo.bench.cost import resolve_pricing
from saikyo.bench.hardware import describe
from saikyo.bench.sweep import SweepConfig, cell_identity, completed_keys, plan, run_sweep
from saikyo.models.repository import ModelRepository
from saikyo.runtime import openvino_installed


@pytest.fixture
def repo(tiny_repository: ModelRepository) -> ModelRepository:
    return tiny_repository  # read only: the sweeps here export nothing


def config(repo: ModelRepository, out: Path, **kw) -> SweepConfig:
    base = dict(
        models=["tiny", "tiny2"], repository=repo.root, out=out, pricing=resolve_pricing("c7i.large"),
        images_per_request=[1, 2], precisions=["fp32", "int8"], requests=3, warmup=1, server_timeout=120,
        log_dir=out.parent / "logs",
    )  # fmt: skip
    base.update(kw)
    return SweepConfig(**base)


def test_sweep_measures_skips_unexported_and_resumes(repo: ModelRepository, tmp_path: Path) -> None:
    out = tmp_path / "results" / "sweep.jsonl"
    cfg = config(repo, out)
    assert len(plan(cfg)) == 2 * 2 * 2  # models x precisions x sizes (one seed level)

    said: list[str] = []
    first = run_sweep(cfg, say=said.append)
    assert (first.ran, first.missing_model, first.failed) == (4, 4, 0)
    assert sum("serving at" in m for m in said) == 2  # one server per model setting
    assert any("tiny-int8" in m and "saikyo models import tiny" in m and "--export-missing" in m for m in said)
    # Progress, one plain line per cell: k of N (the int8 cells, not exported, are not counted), and an ETA
    # from the second cell on.
    counted = [m.split(":")[0] for m in said if m.startswith("cell ")]
    assert [c.split(", ETA")[0] for c in counted] == [f"cell {k} of 4" for k in (1, 2, 3, 4)]
    assert "ETA" not in counted[0] and all(re.search(r", ETA \d+s$", c) for c in counted[1:])
    recs = records.read(out)
    assert len(recs) == 4
    assert {(r["model"], r["images_per_request"]) for r in recs} == {("tiny", 1), ("tiny", 2), ("tiny2", 1), ("tiny2", 2)}
    for r in recs:
        assert (r["mode"], r["requests"], r["errors"]) == ("seed", 3, 0)
        assert (r["backend"], r["device"], r["max_batch_size"]) == ("onnxruntime", "cpu", 16)
        assert r["instance_type"] == "c7i.large" and r["cost_performance_kimg_per_usd"] > 0
        assert r["family"] == "Tiny" and r["weights"] == "random" and r["client_colocated"] is True
        assert r["cell"]["model"] == r["model"] and r["cell"]["requests"] == 3

    # Everything done: nothing measured, no server started.
    said.clear()
    again = run_sweep(cfg, say=said.append)
    assert (again.ran, again.already_done) == (0, 4)
    assert not any("serving at" in m for m in said)

    # Interrupted mid-write: the last record lost and a torn line left behind.
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    resumed = run_sweep(cfg, say=said.append)
    assert (resumed.ran, resumed.already_done) == (1, 3)
    recs = records.read(out)
    assert len(recs) == 4
    assert len({json.dumps(r["cell"], sort_keys=True) for r in recs}) == 4

    # A new load level is a new cell; the old ones stay done.
    more = run_sweep(config(repo, out, precisions=["fp32"], modes=["seed", "closed"], concurrency=[2], seconds=0.5),
                     say=said.append)  # fmt: skip
    assert (more.ran, more.already_done) == (4, 4)
    closed = [r for r in records.read(out) if r["mode"] == "closed"]
    assert len(closed) == 4 and all(r["concurrency"] == 2 and r["ok"] > 0 for r in closed)


def test_workers_are_an_axis_and_records_carry_them(repo: ModelRepository, tmp_path: Path) -> None:
    out = tmp_path / "sweep.jsonl"
    cfg = config(repo, out, models=["tiny"], precisions=["fp32"], images_per_request=[1], workers=[1, 2])
    cells = plan(cfg)
    assert [c.server.workers for c in cells] == [1, 2]
    said: list[str] = []
    summary = run_sweep(cfg, say=said.append)
    assert (summary.ran, summary.failed) == (2, 0), said
    assert any("2 workers" in m and "serving at" in m for m in said)
    recs = records.read(out)
    assert sorted((r["workers"], r["cell"]["workers"]) for r in recs) == [(1, 1), (2, 2)]
    assert all(r["ok"] == 3 for r in recs)
    # The server of the two-worker cell answered from two processes.
    logs = (tmp_path / "logs").glob("server-*.log")
    assert any("with 2 workers" in log.read_text() for log in logs)


def test_cells_recorded_before_workers_were_an_axis_count_as_one_worker(repo: ModelRepository, tmp_path: Path) -> None:
    out = tmp_path / "sweep.jsonl"
    cfg = config(repo, out, models=["tiny"], precisions=["fp32"], images_per_request=[1])
    run_sweep(cfg, say=lambda m: None)
    (rec,) = records.read(out)
    del rec["cell"]["workers"]
    out.write_text(json.dumps(rec) + "\n")
    again = run_sweep(cfg, say=lambda m: None)
    assert (again.ran, again.already_done) == (0, 1)


def test_worker_counts_go_to_the_workers_option_only(repo: ModelRepository, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--workers"):
        config(repo, tmp_path / "out.jsonl", server_args=["--workers", "2"])
    with pytest.raises(ValueError, match="at least 1"):
        config(repo, tmp_path / "out.jsonl", workers=[0])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_interrupted_sweep_stops_its_server_and_resumes(repo: ModelRepository, tmp_path: Path) -> None:
    out = tmp_path / "sweep.jsonl"
    logs = tmp_path / "logs"
    cmd = [
        sys.executable, "-m", "saikyo", "bench", "sweep", "--out", str(out), "--models", "tiny",
        "--images-per-request", "1", "--modes", "seed,closed", "--concurrency", "1", "--seconds", "30",
        "--requests", "3", "--repository", str(repo.root), "--log-dir", str(logs), "--instance-type", "c7i.large",
    ]  # fmt: skip
    # SIGINT as a terminal delivers it: a suite started in the background by a shell (`make test &`) hands its
    # children SIGINT ignored, and the sweep would rightly ignore it too.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(records.read(out)) < 1 and proc.poll() is None:
            time.sleep(0.2)
        if proc.poll() is not None:
            pytest.fail(f"sweep exited early with {proc.returncode}: {proc.communicate()[1]}")
        assert len(records.read(out)) == 1, "the seed cell should finish first"
        time.sleep(0.5)  # inside the 30 s closed-loop cell now
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, stderr
    assert "run the same command again to resume" in stderr
    port = int(next(logs.glob("server-*.log")).stem.split("-")[1])
    assert not _listening(port)  # the sweep stopped the server it started
    assert len(records.read(out)) == 1  # the interrupted cell wrote nothing

    done = completed_keys(out)
    cfg = config(repo, out, models=["tiny"], images_per_request=[1], precisions=["fp32"], modes=["seed", "closed"],
                 concurrency=[1], seconds=0.5)  # fmt: skip
    # Same identity as the CLI run except the closed cell's seconds: the seed cell is done, closed is new.
    assert len(done) == 1
    resumed = run_sweep(cfg, say=lambda m: None)
    assert (resumed.ran, resumed.already_done) == (1, 1)


def test_torch_targets_plan_no_int8_cells(repo: ModelRepository, tmp_path: Path) -> None:
    # NAME-int8 is an ONNX Runtime model: a GPU sweep with --targets torch/cuda measures fp32 only.
    cfg = config(repo, tmp_path / "s.jsonl", targets=["onnxruntime/cpu", "torch/cuda"], images_per_request=[1])
    got = {(c.server.model, c.server.backend) for c in plan(cfg)}
    assert got == {("tiny", "onnxruntime"), ("tiny-int8", "onnxruntime"), ("tiny", "torch"),
                   ("tiny2", "onnxruntime"), ("tiny2-int8", "onnxruntime"), ("tiny2", "torch")}  # fmt: skip


def test_targets_and_precisions_plan_bf16_on_openvino_only(repo: ModelRepository, tmp_path: Path) -> None:
    cfg = config(repo, tmp_path / "sweep.jsonl", models=["tiny"], images_per_request=[1],
                 precisions=["fp32", "bf16", "int8"], targets=["openvino/cpu", "onnxruntime/cpu"])  # fmt: skip
    cells = plan(cfg)
    assert [(c.server.model, c.server.backend, c.server.precision) for c in cells] == [
        ("tiny", "openvino", "fp32"), ("tiny", "onnxruntime", "fp32"), ("tiny", "openvino", "bf16"),
        ("tiny-int8", "openvino", "int8"), ("tiny-int8", "onnxruntime", "int8"),
    ]  # fmt: skip
    # The server is told fp32 or bf16 (OpenVINO's own default may be bf16); int8 is the file's.
    assert [c.server.args()[-2:] for c in cells[:3]] == [["--precision", "fp32"]] * 2 + [["--precision", "bf16"]]
    assert "--precision" not in cells[3].server.args()
    # Identities name the precision only where the model's name does not: older sweeps' cells stay done.
    hw = describe()
    assert [cell_identity(c, cfg, hw).get("precision") for c in cells] == [None, None, "bf16", None, None]
    assert cell_identity(cells[2], cfg, hw) != cell_identity(cells[0], cfg, hw)
    with pytest.raises(ValueError, match="bf16 needs a target on openvino"):
        config(repo, tmp_path / "x.jsonl", precisions=["bf16"], targets=["onnxruntime/cpu"])


@pytest.mark.skipif(not openvino_installed(), reason="OpenVINO is not installed")
def test_sweep_on_openvino_records_backend_and_precision(repo: ModelRepository, tmp_path: Path) -> None:
    from saikyo.runtime.openvino import cpu_has_native_bf16

    precision = "bf16" if cpu_has_native_bf16() else "fp32"
    out = tmp_path / "sweep.jsonl"
    cfg = config(repo, out, models=["tiny"], images_per_request=[2], precisions=[precision], targets=["openvino/cpu"])
    summary = run_sweep(cfg, say=lambda m: None)
    assert (summary.ran, summary.failed) == (1, 0), summary.messages
    (rec,) = records.read(out)
    assert (rec["backend"], rec["precision"], rec["errors"]) == ("openvino", precision, 0)
