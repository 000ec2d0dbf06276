"""Runners: one loaded network that turns a batch of pixels or tensors into probabilities."""

from __future__ import annotations

from saikyo.models.repository import Entry
from saikyo.runtime.base import Runner, RunnerError
from saikyo.settings import Settings


def create_runner(model: str | Entry, settings: Settings) -> Runner:
    """Pick the runner for `settings.backend` / `settings.device` and load `model`: a version already
    resolved from the repository, or a name (its latest version)."""
    backend = settings.backend
    if backend == "auto":
        backend = "torch" if _cuda_available() else "onnxruntime"
    if backend == "onnxruntime":
        from saikyo.runtime.onnxruntime import OnnxRunner

        return OnnxRunner.load(model, settings)
    if backend == "torch":
        try:
            from saikyo.runtime.torch import TorchRunner  # type: ignore[import-not-found]
        except ImportError as exc:
            raise RunnerError(f"the torch backend is not available: {exc}") from None
        return TorchRunner.load(model, settings)
    raise RunnerError(f"unknown backend {backend!r}; choose onnxruntime, torch or auto")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


__all__ = ["Runner", "RunnerError", "create_runner"]
