"""Errors a newcomer meets on the command line: one line on stderr naming the fix, and the exit codes
README's "Exit codes" states (1: the work failed; 2: the command cannot work as given)."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from saikyo.models.repository import ModelRepository
from saikyo.settings import DEFAULT_LOCATION
from saikyo.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "tests" / "data" / "cat.jpg"


def saikyo(*args: str, cwd: Path | None = None, code: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`saikyo ARGS` in a fresh process; `code` runs first (e.g. to make an extra unimportable)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "80"}
    env = {k: v for k, v in env.items() if not k.startswith("SAIKYO_")}
    prelude = (code or "") + "\nimport sys; from saikyo.cli import app; sys.argv[0] = 'saikyo'; app()"
    return subprocess.run([sys.executable, "-c", prelude, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and "Error(" not in lines[0]  # no exception repr
    return lines[0]


def test_bench_run_against_a_dead_url_says_nothing_answers(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = one_error_line(saikyo("bench", "run", "--url", f"http://127.0.0.1:{port}", "--requests", "1"), 1)
    assert f"nothing answers at 127.0.0.1:{port}" in line and "saikyo serve" in line and "--url" in line


def test_classify_an_unknown_model_names_the_zoo_and_its_listing_works(tmp_path: Path) -> None:
    line = one_error_line(saikyo("classify", "--model", "nosuchnet", str(CAT), cwd=tmp_path), 2)
    assert "unknown model 'nosuchnet'" in line and "efficientnet_lite0" in line
    assert "saikyo models list" in line
    assert saikyo("models", "list", cwd=tmp_path).returncode == 0


@pytest.mark.slow  # exports a network with torch: a minute on two cores
def test_classify_a_zoo_model_not_yet_exported_suggests_a_command_that_works(tmp_path: Path) -> None:
    repo = tmp_path / "elsewhere"
    line = one_error_line(saikyo("classify", "--model", "squeezenet1_1", "--repository", str(repo), str(CAT)), 2)
    fix = line.split("run: ", 1)[1]
    argv = shlex.split(fix)
    assert argv[:3] == ["saikyo", "models", "export"] and str(repo) in argv  # the repository it was asked about
    assert saikyo(*argv[1:]).returncode == 0
    after = saikyo("classify", "--model", "squeezenet1_1", "--repository", str(repo), str(CAT))
    assert after.returncode == 0 and "squeezenet1_1" in after.stdout


def test_the_suggested_export_names_the_repository_unless_it_is_the_default() -> None:
    assert ModelRepository("/srv/my models").fix("resnet50").endswith("--repository '/srv/my models'")
    assert "--repository" not in ModelRepository(DEFAULT_LOCATION).fix("resnet50")
    assert Settings().repository == DEFAULT_LOCATION
    assert ModelRepository("/x").fix("nosuchnet").startswith("saikyo models import nosuchnet")  # not a zoo name


def test_a_port_in_use_is_exit_1_with_one_or_several_workers(tmp_path: Path) -> None:
    from support.tinymodel import add_tiny_model

    repo = ModelRepository(tmp_path / "repo")
    repo.root.mkdir()
    add_tiny_model(repo, "tiny")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        lines = []
        for workers in ("1", "2"):
            result = saikyo("serve", "--port", str(port), "--models", "tiny", "--repository", str(repo.root),
                            "--backend", "onnxruntime", "--workers", workers)
            lines.append(one_error_line(result, 1))
    assert lines[0] == lines[1]
    assert f"cannot listen on 127.0.0.1:{port}" in lines[0] and "--port" in lines[0]


def test_models_list_of_a_repository_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    line = one_error_line(saikyo("models", "list", "--repository", str(missing)), 2)
    assert f"no model repository at {missing}" in line
    assert f"saikyo models export efficientnet_lite0 --weights imagenet --repository {missing}" in line
    assert not missing.exists()  # nothing created on the way
    # Before the first export, the default repository's absence is a note, and the zoo is listed.
    first = saikyo("models", "list", "--json", cwd=tmp_path)
    assert first.returncode == 0 and '"efficientnet_lite0"' in first.stdout
    assert "no model repository at model-repository yet" in first.stderr


@pytest.mark.parametrize("command", ["plot", "report"])
def test_bench_plot_without_the_bench_extra_names_it(tmp_path: Path, command: str) -> None:
    records = tmp_path / "r.jsonl"
    records.write_text("")
    result = saikyo("bench", command, str(records), code="import sys; sys.modules['matplotlib'] = None")
    line = one_error_line(result, 2)
    assert "needs matplotlib" in line and "pip install 'saikyo[bench]'" in line
