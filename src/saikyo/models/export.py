"""torch -> ONNX into the model repository, checked against torch before it is written.

ONNX contract for every entry: one input "input", float32 [N, 3, H, W], already normalised with the
model's mean/std; one output "logits", float32 [N, num_classes]; N symbolic. One self-contained file.
torch is imported lazily so that `saikyo models list` and the server never load it.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from saikyo.models import zoo
from saikyo.models.capture import quiet
from saikyo.models.contract import INPUT_NAME, OUTPUT_NAME, check_contract, io_meta
from saikyo.models.errors import ExportError
from saikyo.models.provenance import sha256_file, utc_now, versions, weights_provenance
from saikyo.models.repository import WEIGHTS_FILE, Entry, ModelRepository

MIN_OPSET = 17
# ONNX Runtime fuses and reorders float ops, so outputs differ from torch by float rounding; a real
# export bug shows up orders of magnitude above this fraction of the logits' range.
CHECK_RTOL = 1e-3
CHECK_ATOL = 1e-5
CHECK_BATCHES = (1, 3)  # both differ from the batch of 2 that is traced: proves the batch dim is symbolic

Progress = Callable[[str], None]


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
    quantize = quantize or zoo.split_variant(name)[1]
    if quantize is None:
        return _export_fp32(spec, repository, weights or spec.default_weights, opset, say)
    if quantize not in zoo.VARIANTS:
        raise ExportError(f"unknown quantization {quantize!r}; supported: {', '.join(zoo.VARIANTS)}")
    if weights is not None or not repository.has(spec.name):
        _export_fp32(spec, repository, weights or spec.default_weights, opset, say)
    from saikyo.models import quantize as quantize_module  # onnxruntime.quantization is slow to import

    return quantize_module.quantize_int8(spec, repository, calibration_images, say)


def _export_fp32(spec: zoo.ModelSpec, repository: ModelRepository, weights: str, opset: int, say: Progress) -> Entry:
    try:
        import torch

        from saikyo.models import builders
    except ImportError as e:
        raise ExportError(f"exporting needs torch: pip install 'saikyo[export]' ({e})") from e

    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    provenance, source = weights_provenance(spec, weights)
    say(f"building {spec.name} ({provenance} weights)")
    started = time.perf_counter()
    model = builders.build(spec, weights)
    size = spec.preprocessing.input_size

    repository.root.mkdir(parents=True, exist_ok=True)
    # Work beside the repository so that the final move is a rename, and a failure leaves nothing behind.
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}.export.", dir=repository.root) as tmp:
        path = Path(tmp) / "model.onnx"
        say(f"exporting to ONNX (opset {opset})")
        with torch.no_grad():
            _torch_to_onnx(model, path, size, opset)
        check_contract(path, size, spec.num_classes)
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
