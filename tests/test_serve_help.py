"""`saikyo serve --help`: every setting in its panel, every flag whole at 80 columns; renamed flags and
their old names and variables."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import saikyo.server
from saikyo.cli import app
from saikyo.settings import PANELS, Settings, cli_fields, env_names, flag_of

SRC = Path(__file__).resolve().parents[1] / "src"


def _help_at(columns: int, *command: str) -> str:
    env = {**os.environ, "COLUMNS": str(columns), "PYTHONPATH": str(SRC), "TERM": "dumb", "NO_COLOR": "1"}
    env.pop("TERMINAL_WIDTH", None)
    out = subprocess.run([sys.executable, "-m", "saikyo", *(command or ("serve",)), "--help"], env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return out


def test_help_at_80_columns_shows_every_flag_whole_under_its_panel() -> None:
    text = _help_at(80)
    assert max(map(len, text.splitlines())) <= 80
    assert "…" not in text  # nothing cut: no flag, no default, no variable
    # The panels in order, each flag inside its own.
    titles = re.findall(r"^╭─ (.+?) ─", text, re.M)
    assert titles == ["Options", *PANELS]
    sections = dict(zip(titles, re.split(r"^╭─ .+? ─+╮$", text, flags=re.M)[1:]))
    for f in cli_fields():
        shown = re.findall(r"^│ (--[a-z0-9-]+) ", sections[f.metadata["panel"]], re.M)
        assert flag_of(f) in shown, f"{flag_of(f)} is not whole in the {f.metadata['panel']} panel"
        assert env_names(f)[0] in text


@pytest.mark.parametrize("command", [("bench", "sweep"), ("bench", "capacity"), ("bench", "run"),
                                     ("models", "push"), ("models", "export"), ("classify",)])
def test_other_commands_help_is_whole_at_80_columns(command: tuple[str, ...]) -> None:
    text = _help_at(80, *command)
    assert "…" not in text and max(map(len, text.splitlines())) <= 80


def test_every_setting_names_a_known_panel() -> None:
    from dataclasses import fields

    assert {f.metadata["panel"] for f in fields(Settings)} == set(PANELS)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """The Settings `saikyo serve` would serve with; it stops before serving."""
    seen: list[Settings] = []

    def fake_create_app(settings: Settings) -> None:
        seen.append(settings)
        raise SystemExit(0)

    monkeypatch.setattr(saikyo.server, "create_app", fake_create_app)
    for f in cli_fields():
        for name in env_names(f):
            monkeypatch.delenv(name, raising=False)
    return seen


def test_renamed_flags_and_their_old_names_both_work(served: list[Settings]) -> None:
    new = ["serve", "--openvino-precision", "fp32", "--torch-dtype", "bf16", "--torch-batch-buckets", "1,4",
           "--torch-device-decode", "off"]
    old = ["serve", "--precision", "fp32", "--dtype", "bf16", "--batch-buckets", "1,4", "--device-decode", "off"]
    for args in (new, old):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    a, b = served
    assert a == b
    assert (a.precision, a.torch_dtype, a.batch_buckets, a.device_decode) == ("fp32", "bf16", (1, 4), "off")


def test_switches_turn_off_with_their_no_form(served: list[Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAIKYO_ORT_SPINNING", "yes")
    for args in (["serve"], ["serve", "--no-ort-spinning", "--no-cuda-graphs"], ["serve", "--torch-compile"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    env_only, turned_off, turned_on = served
    assert env_only.ort_spinning is True and env_only.cuda_graphs is True and env_only.torch_compile is False
    assert turned_off.ort_spinning is False and turned_off.cuda_graphs is False
    assert turned_on.torch_compile is True and turned_on.ort_spinning is True


def test_old_variable_names_still_set_renamed_settings_and_the_new_one_wins() -> None:
    old = Settings.from_env({"SAIKYO_PRECISION": "fp32", "SAIKYO_BATCH_BUCKETS": "2,4", "SAIKYO_DEVICE_DECODE": "on"})
    assert (old.precision, old.batch_buckets, old.device_decode) == ("fp32", (2, 4), "on")
    both = Settings.from_env({"SAIKYO_PRECISION": "fp32", "SAIKYO_OPENVINO_PRECISION": "bf16"})
    assert both.precision == "bf16"
    flag = Settings.from_env({"SAIKYO_OPENVINO_PRECISION": "bf16"}, precision="fp32")
    assert flag.precision == "fp32"


def test_a_variable_reaches_serve_through_the_flag(served: list[Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAIKYO_PRECISION", "fp32")  # the old name, read by Settings.from_env
    monkeypatch.setenv("SAIKYO_TORCH_BATCH_BUCKETS", "1,2")
    assert CliRunner().invoke(app, ["serve"]).exit_code == 0
    monkeypatch.setenv("SAIKYO_OPENVINO_PRECISION", "bf16")
    assert CliRunner().invoke(app, ["serve", "--torch-batch-buckets", "8"]).exit_code == 0
    first, second = served
    assert (first.precision, first.batch_buckets) == ("fp32", (1, 2))
    assert (second.precision, second.batch_buckets) == ("bf16", (8,))
