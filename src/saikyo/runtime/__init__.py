"""Runners: one loaded network that turns a batch of pixels or tensors into probabilities."""

from __future__ import annotations

import importlib.util
import logging
import platform
from typing import Protocol

from saikyo.models import zoo
from saikyo.models.location import entry_for
from saikyo.models.repository import Entry
from saikyo.runtime.base import Runner, RunnerError
from saikyo.runtime.options import RunnerOptions, resolve_serving
from saikyo.settings import BACKENDS, Settings

log = logging.getLogger(__name__)


def create_runner(entry: Entry, options: RunnerOptions) -> Runner:
    """Pick the runner for `options.backend` / `options.device` and load `entry`, a version whose files
    are local, with the model's effective options (options.resolve_serving)."""
    backend = options.backend
    if backend == "auto":
        backend, why = auto_backend(entry.name, options)
        if backend == "torch" and entry.meta.get("family") == "imported":
            # The torch runner builds zoo networks; an import is its ONNX graph (CUDA provider where installed).
            backend, why = "onnxruntime", "an imported model is served from its ONNX graph"
        log.info("model %s: backend auto -> %s by the static rule, not a measurement (%s)", entry.name, backend, why)
    if backend == "onnxruntime":
        from saikyo.runtime.onnxruntime import OnnxRunner

        return OnnxRunner.load(entry, options)
    if backend == "openvino":
        if not openvino_installed():
            raise RunnerError("the openvino backend is not available: pip install 'saikyo[openvino]'")
        from saikyo.runtime.openvino import OpenVinoRunner

        return OpenVinoRunner.load(entry, options)
    if backend == "torch":
        try:
            from saikyo.runtime.torch.runner import TorchRunner  # type: ignore[import-not-found]
        except ImportError as exc:
            raise RunnerError(f"the torch backend is not available: {exc}") from None
        return TorchRunner.load(entry, options)
    raise RunnerError(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")


def load_runner(model: str | Entry, settings: Settings) -> Runner:
    """A runner outside a server (`saikyo classify`, scripts, tests): `model` resolved in the settings'
    repository when it is a name, with its effective options for these settings."""
    return create_runner(*runner_inputs(model, settings))


def runner_inputs(model: str | Entry, settings: Settings) -> tuple[Entry, RunnerOptions]:
    """What a runner's `load` takes, for `model` (a name: its latest version) under `settings`."""
    entry = entry_for(model, settings)
    return entry, resolve_serving(entry.meta, settings).runner_options(settings)


class _Choice(Protocol):
    """What auto_backend reads: RunnerOptions, or Settings."""

    device: str
    precision: str


def auto_backend(name: str, choice: _Choice) -> tuple[str, str]:
    """The fastest installed backend for this model on this machine, and why (the rule README states,
    from benchmarks/backends.py): torch on CUDA; on an x86 CPU, OpenVINO wherever it runs a lower precision
    than fp32 (bf16 on CPUs that compute it natively, or an int8 file); ONNX Runtime otherwise, since
    OpenVINO's fp32 is no faster than ONNX Runtime's."""
    if choice.device in ("cuda", "auto") and _cuda_available():
        return "torch", "CUDA is present"
    if choice.device == "cuda":
        return "onnxruntime", "CUDA asked for, torch sees none: ONNX Runtime's CUDA provider, if installed"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "onnxruntime", f"OpenVINO is not used on {platform.machine()} CPUs"
    if not openvino_installed():
        return "onnxruntime", "OpenVINO is not installed"
    if zoo.precision_of(name) == "int8":
        return "openvino", "an int8 file on an x86 CPU"
    if choice.precision == "fp32":
        return "onnxruntime", "fp32 asked for: OpenVINO's fp32 is no faster"
    from saikyo.runtime.openvino import cpu_has_native_bf16

    if cpu_has_native_bf16():
        return "openvino", "the CPU computes bf16 natively"
    if choice.precision == "bf16":
        return "openvino", "bf16 asked for (the CPU lacks it: OpenVINO will say so)"
    return "onnxruntime", "the CPU has no native bf16, and OpenVINO's fp32 is no faster"


def openvino_installed() -> bool:
    # Looked up, not imported: importing openvino has side effects that runtime/openvino.py guards.
    return importlib.util.find_spec("openvino") is not None


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


__all__ = ["BACKENDS", "Runner", "RunnerError", "RunnerOptions", "auto_backend", "create_runner", "load_runner", "runner_inputs"]
