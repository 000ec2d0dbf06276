"""torch -> ONNX into the model repository, checked against torch before it is written.

ONNX contract for every entry: one input "input", float32 [N, 3, H, W], already normalised with the
model's mean/std; one output "logits", float32 [N, num_classes]; N symbolic. One self-contained file.
torch is imported lazily so that `saikyo models list` and the server never load it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import saikyo
from saikyo import zoo
from saikyo.repository import WEIGHTS_FILE, Entry, ModelRepository

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_OPSET = 17
# ONNX Runtime fuses and reorders float ops, so outputs differ from torch by float rounding; a real
# export bug shows up orders of magnitude above this fraction of the logits' range.
CHECK_RTOL = 1e-3
CHECK_ATOL = 1e-5
CHECK_BATCHES = (1, 3)  # both differ from the batch of 2 that is traced: proves the batch dim is symbolic

QUANTIZATIONS = ("int8",)

Progress = Callable[[str], None]


class ExportError(RuntimeError):
    """The export or its check failed; nothing was written to the repository."""


class WeightsUnavailable(ExportError):
    """The requested weights cannot be had here (offline host, unsupported source, bad file)."""


def export_model(
    name: str,
    repository: ModelRepository,
    weights: str | None = None,
    opset: int = 18,
    quantize: str | None = None,
    calibration_images: list[Path] | None = None,
    progress: Progress | None = None,
) -> Entry:
    """Export zoo model `name` (weights: "imagenet" | "random" | a state-dict path; None = spec default).

    quantize="int8" (or a name ending in "-int8") writes NAME-int8 from the fp32 entry, exporting
    that first when it is missing or when `weights` is given.
    """
    spec = zoo.get(name)
    say = progress or (lambda _msg: None)
    if name != spec.name:  # "resnet50-int8"
        quantize = quantize or name[len(spec.name) + 1 :]
    if quantize is None:
        return _export_fp32(spec, repository, weights or spec.default_weights, opset, say)
    if quantize not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {quantize!r}; supported: {', '.join(QUANTIZATIONS)}")
    if weights is not None or not repository.has(spec.name):
        _export_fp32(spec, repository, weights or spec.default_weights, opset, say)
    from saikyo import quantize as quantize_module  # onnxruntime.quantization is slow to import

    return quantize_module.quantize_int8(spec, repository, calibration_images, say)


def list_models(repository: ModelRepository) -> list[dict[str, Any]]:
    """One row per zoo model and per exported variant (NAME-int8), in zoo order."""
    exported = set(repository.names())
    rows = []
    for spec in zoo.ZOO.values():
        rows.append(_row(repository, spec, spec.name, spec.name in exported, spec.description))
        for suffix in zoo.VARIANT_SUFFIXES:
            variant = spec.name + suffix
            if variant in exported:
                rows.append(_row(repository, spec, variant, True, f"{spec.description}, {suffix[1:]} quantised"))
    return rows


def _row(repository: ModelRepository, spec: zoo.ModelSpec, name: str, exported: bool, description: str) -> dict:
    entry = repository.get(name) if exported else None
    return {
        "name": name,
        "family": spec.family,
        "exported": exported,
        "weights": entry.meta.get("weights") if entry else None,
        "size_mb": round(entry.size_bytes / 1e6, 1) if entry else None,
        "input_size": spec.preprocessing.input_size,
        "description": description,
    }


def _export_fp32(spec: zoo.ModelSpec, repository: ModelRepository, weights: str, opset: int, say: Progress) -> Entry:
    try:
        import torch

        from saikyo import torch_models
    except ImportError as e:
        raise ExportError(f"exporting needs torch: pip install 'saikyo[export]' ({e})") from e

    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    provenance, source = _weights_provenance(spec, weights)
    say(f"building {spec.name} ({provenance} weights)")
    started = time.perf_counter()
    model = torch_models.build(spec, weights)
    size = spec.preprocessing.input_size

    repository.root.mkdir(parents=True, exist_ok=True)
    # Work beside the repository so that the final move is a rename, and a failure leaves nothing behind.
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}.export.", dir=repository.root) as tmp:
        path = Path(tmp) / "model.onnx"
        say(f"exporting to ONNX (opset {opset})")
        with torch.no_grad():
            _torch_to_onnx(model, path, size, opset)
        _check_contract(path, size, spec.num_classes)
        say("checking ONNX Runtime against torch")
        check = _check_against_torch(model, path, size, spec.num_classes)
        weights_path = Path(tmp) / WEIGHTS_FILE
        torch.save(model.state_dict(), weights_path)
        meta = {
            "name": spec.name,
            "family": spec.family,
            "base_model": spec.name,
            "description": spec.description,
            "precision": "fp32",
            "weights": provenance,
            "weights_source": source,
            "weights_license": spec.weights_license,
            "num_classes": spec.num_classes,
            "input_size": size,
            "preprocessing": spec.preprocessing.to_dict(),
            "opset": opset,
            "builder": spec.builder,
            "torch_weights": WEIGHTS_FILE,
            "exported_at": utc_now(),
            "export_seconds": round(time.perf_counter() - started, 1),
            "versions": versions(),
            **io_meta(size, spec.num_classes),
            "check": check,
            "sha256": sha256_file(path),
        }
        entry = repository.write(spec.name, path, meta, extra_files=[weights_path])
    say(f"wrote {entry.path} ({entry.size_bytes / 1e6:.1f} MB)")
    return entry


def _weights_provenance(spec: zoo.ModelSpec, weights: str) -> tuple[str, str]:
    """(meta "weights" value, human-readable source)."""
    if weights == "imagenet":
        return "imagenet-pretrained", spec.weights_source
    if weights == "random":
        from saikyo.torch_models import RANDOM_SEED

        return "random", f"default initialisation, torch seed {RANDOM_SEED}"
    path = Path(weights)
    if not path.is_file():
        raise WeightsUnavailable(f"--weights must be 'imagenet', 'random' or a state-dict file; {weights!r} is none")
    return f"file:{sha256_file(path)}", str(path.resolve())


def _torch_to_onnx(model: Any, path: Path, size: int, opset: int) -> None:
    import torch

    example = torch.randn(2, 3, size, size)
    with quiet() as log:
        try:
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=False,
            )
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed: {e}\n{log.read()[-2000:]}") from e


@contextlib.contextmanager
def quiet() -> Iterator[Any]:
    """Swallow the exporter's progress prints, warnings and native-library chatter (fds 1 and 2).

    Yields the capture file so that a failure can show what was said.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as log:
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            with (
                warnings.catch_warnings(),
                contextlib.redirect_stdout(log),
                contextlib.redirect_stderr(log),
            ):
                warnings.simplefilter("ignore")
                yield _Rewinding(log)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


class _Rewinding:
    def __init__(self, log: Any) -> None:
        self._log = log

    def read(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read()


def _check_contract(path: Path, size: int, num_classes: int) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise ExportError("the exported model keeps weights in external files; expected one self-contained file")
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in model.graph.output] != [OUTPUT_NAME]:
        raise ExportError(
            f"exported I/O is {[i.name for i in inputs]} -> {[o.name for o in model.graph.output]}, "
            f"expected [{INPUT_NAME!r}] -> [{OUTPUT_NAME!r}]"
        )
    for value, want in ((inputs[0], [None, 3, size, size]), (model.graph.output[0], [None, num_classes])):
        dims = value.type.tensor_type.shape.dim
        got = [None if d.dim_param or not d.HasField("dim_value") else d.dim_value for d in dims]
        if got != want or not dims[0].dim_param:
            raise ExportError(f"{value.name} has shape {got}, expected {want} with a symbolic batch dim")


def _check_against_torch(model: Any, path: Path, size: int, num_classes: int) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    worst, tolerance = 0.0, float("inf")
    for batch in CHECK_BATCHES:
        x = torch.randn(batch, 3, size, size, generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        if got.shape != (batch, num_classes) or got.dtype != np.float32:
            raise ExportError(
                f"ONNX Runtime returned {got.dtype}{list(got.shape)}, expected float32[{batch}, {num_classes}]"
            )
        diff = float(np.max(np.abs(got - expected)))
        tol = CHECK_RTOL * float(np.max(np.abs(expected))) + CHECK_ATOL
        if not diff <= tol:  # also catches NaN
            raise ExportError(
                f"ONNX Runtime disagrees with torch at batch {batch}: max |diff| {diff:.3g} > tolerance {tol:.3g}"
            )
        worst, tolerance = max(worst, diff), min(tolerance, tol)
    return {
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "batch": list(CHECK_BATCHES),
        "max_abs_diff": worst,
        "tolerance": tolerance,
    }


def io_meta(size: int, num_classes: int) -> dict[str, list[dict[str, Any]]]:
    """Inputs/outputs in the v2 (KServe/Triton) model-metadata shape; -1 is the dynamic batch."""
    return {
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 3, size, size]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, num_classes]}],
    }


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
