"""Which CPU this is: its model name and the cores this process may use. Tunings are keyed by both
(models/tunings.py), and benchmark records describe the machine with them (bench/hardware.py)."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from saikyo.settings import available_cores


@dataclass(frozen=True)
class Cpu:
    model: str
    cores: int

    def __str__(self) -> str:
        return f"{self.model}, {self.cores} cores"


def this_cpu() -> Cpu:
    return Cpu(cpu_model(), available_cores())


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's marketing name from /proc/cpuinfo (x86 "model name", Arm "Model" or "cpu model")."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model") and value.strip():
            return " ".join(value.split())
    return platform.processor() or platform.machine() or "unknown CPU"
