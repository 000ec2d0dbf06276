"""Where a model file came from: digests, timestamps, tool versions, the weights' origin."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
from datetime import datetime, timezone
from pathlib import Path

import saikyo
from saikyo.models.errors import WeightsUnavailable
from saikyo.models.zoo import ModelSpec

# Fixed so that two "random" exports of the same model are the same network (comparable benchmarks).
RANDOM_SEED = 0


def weights_provenance(spec: ModelSpec, weights: str) -> tuple[str, str]:
    """(meta.json "weights" value, human-readable source) for weights "imagenet" | "random" | a file."""
    if weights == "imagenet":
        return "imagenet-pretrained", spec.weights_source
    if weights == "random":
        return "random", f"default initialisation, torch seed {RANDOM_SEED}"
    path = Path(weights)
    if not path.is_file():
        raise WeightsUnavailable(f"--weights must be 'imagenet', 'random' or a state-dict file; {weights!r} is none")
    return f"file:{sha256_file(path)}", str(path.resolve())


def versions() -> dict[str, str]:
    found = {"saikyo": saikyo.__version__}
    for dist in ("torch", "torchvision", "timm", "onnx", "onnxscript", "onnxruntime"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[dist] = importlib.metadata.version(dist)
    return found


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
