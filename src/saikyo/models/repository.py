"""The on-disk model repository: <root>/<name>/model.onnx + meta.json, one directory per model.

Triton-like layout so that a person can inspect, copy or delete a model with ordinary tools.
Writes are atomic: a half-written export never looks like a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saikyo.models import zoo
from saikyo.models.errors import ModelNotExported

MODEL_FILE = "model.onnx"
META_FILE = "meta.json"
# The same network's torch state dict, beside model.onnx: the torch runner loads exactly these weights.
WEIGHTS_FILE = "weights.pt"


@dataclass(frozen=True)
class Entry:
    name: str
    path: Path  # the model.onnx file
    meta: dict[str, Any]

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


class ModelRepository:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def model_dir(self, name: str) -> Path:
        return self.root / name

    def model_path(self, name: str) -> Path:
        return self.model_dir(name) / MODEL_FILE

    def has(self, name: str) -> bool:
        d = self.model_dir(name)
        return (d / MODEL_FILE).is_file() and (d / META_FILE).is_file()

    def get(self, name: str) -> Entry:
        if not self.has(name):
            raise ModelNotExported(name, self.root, export_command(name))
        meta = json.loads((self.model_dir(name) / META_FILE).read_text())
        return Entry(name=name, path=self.model_path(name), meta=meta)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.has(p.name))

    def write(self, name: str, model_file: Path, meta: dict[str, Any], extra_files: Sequence[Path] = ()) -> Entry:
        """Move `model_file` (and `extra_files`, by their names) into place with its meta.json,
        replacing any previous version atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
        try:
            shutil.move(str(model_file), staging / MODEL_FILE)
            for extra in extra_files:
                shutil.move(str(extra), staging / Path(extra).name)
            (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            final = self.model_dir(name)
            old = None
            if final.exists():
                old = self.root / f".{name}.old.{os.getpid()}"
                os.replace(final, old)
            os.replace(staging, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self.get(name)


def export_command(name: str) -> str:
    """The command that puts `name` in a repository: the fp32 export, or the variant's quantisation."""
    base, variant = zoo.split_variant(name)
    if variant is not None:
        return f"saikyo models export {base} --quantize {variant}"
    spec = zoo.ZOO.get(base)
    return f"saikyo models export {base} --weights {spec.default_weights if spec else 'random'}"
