"""What machine this is, in the words a benchmark record needs."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from saikyo.runtime.cpu import cpu_model
from saikyo.settings import available_cores


@dataclass(frozen=True)
class Hardware:
    cpu_model: str
    cores: int | None  # cores this process may use (affinity), what a local server gets; None: unknown
    memory_gib: float | None
    accelerator: str  # "" when none was found
    virtualised: bool

    @property
    def description(self) -> str:
        parts = [self.cpu_model] + ([f"{self.cores} cores"] if self.cores else [])
        if self.memory_gib:
            parts.append(f"{self.memory_gib:.0f} GiB")
        if self.accelerator:
            parts.append(self.accelerator)
        if self.virtualised:
            parts.append("VM")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return {**asdict(self), "description": self.description}


def describe() -> Hardware:
    cpuinfo = _read("/proc/cpuinfo")
    return Hardware(
        cpu_model=cpu_model(cpuinfo),
        cores=available_cores(),
        memory_gib=_memory_gib(),
        accelerator=_gpus(),
        virtualised="hypervisor" in cpuinfo,
    )


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _memory_gib() -> float | None:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> str:
    """NVIDIA GPUs as "1x NVIDIA H100 80GB HBM3"; nvidia-smi is the one source that needs no torch."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ""
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    names = [n.strip() for n in out.splitlines() if n.strip()]
    if not names:
        return ""
    return ", ".join(f"{names.count(n)}x {n}" for n in dict.fromkeys(names))
