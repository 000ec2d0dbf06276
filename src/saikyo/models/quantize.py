"""Static int8 quantisation of an exported fp32 entry with ONNX Runtime: NAME -> NAME-int8.

QDQ format, weights int8 per output channel, activations uint8 per tensor: ONNX Runtime fuses the
QDQ pairs into QLinearConv/QGemm whose u8 x s8 kernels use VNNI/AMX on x86.
Calibration runs the fp32 model on real photos, preprocessed by the serving code itself.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image

from saikyo.inference import imaging
from saikyo.inference.preprocessing import Preprocessing
from saikyo.models import zoo
from saikyo.models.capture import quiet
from saikyo.models.contract import INPUT_NAME, OUTPUT_NAME
from saikyo.models.errors import ExportError
from saikyo.models.provenance import sha256_file, utc_now, versions
from saikyo.models.repository import Entry, ModelRepository

CALIBRATION_BATCH = 4
# scikit-image's bundled photos (no download), split once: int8 models are calibrated on the first set,
# and accuracy (int8, bf16) is compared on the second, which the calibration never saw. tests/data holds
# JPEGs of chelsea (cat.jpg), astronaut and coffee, so those three are held out.
CALIBRATION_PHOTOS = (
    "coins", "moon", "immunohistochemistry", "hubble_deep_field", "retina", "grass", "gravel", "brick",
)  # fmt: skip
HELD_OUT_PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "camera")


def quantize_int8(
    spec: zoo.ModelSpec,
    repository: ModelRepository,
    calibration_images: list[Path] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Entry:
    """Write `<spec.name>-int8` from the exported fp32 entry; record how it was made and how it agrees."""
    say = progress or (lambda _msg: None)
    base = repository.get(spec.name)
    name = zoo.variant_name(spec.name, "int8")
    with tempfile.TemporaryDirectory(prefix=f".{name}.export.", dir=repository.root) as tmp:
        path, meta = quantize_file(base, name, f"{spec.description}, int8 quantised", Path(tmp), calibration_images, say)
        entry = repository.write(name, path, meta)
    agreement = meta["quantization"]["top1_agreement_with_fp32"]
    say(f"wrote {entry.path} ({entry.size_bytes / 1e6:.1f} MB), top-1 agrees with fp32 on {agreement:.0%}")
    return entry


def quantize_file(
    base: Entry,
    name: str,
    description: str,
    directory: Path,
    calibration_images: list[Path] | None,
    say: Callable[[str], None],
) -> tuple[Path, dict[str, Any]]:
    """The int8 model.onnx of the fp32 `base` (its files local), written in `directory`, and its meta.json
    (base's, plus how it was quantised and how its top-1 agrees with fp32 on held-out photos)."""
    pre = Preprocessing.from_dict(base.meta["preprocessing"])
    photos, sources = calibration_photos(calibration_images)
    samples = network_inputs(photos, pre)
    started = time.perf_counter()
    options = {
        "activation_type": QuantType.QUInt8,
        "weight_type": QuantType.QInt8,
        "per_channel": True,
        "calibrate_method": CalibrationMethod.MinMax,
        # Not CalibMaxIntermediateOutputs: onnxruntime 1.32 discards the collected ranges when it is hit.
    }
    prepared, path = directory / "prepared.onnx", directory / "model.onnx"
    say(f"quantizing {base.name} to int8 ({len(samples)} calibration samples from {len(photos)} photos)")
    with quiet() as log:
        try:
            quant_pre_process(str(base.path), str(prepared))
            # The classifier's output stays float: uint8 logits tie the top classes' probabilities.
            last = _output_nodes(prepared)
            quantize_static(
                str(prepared),
                str(path),
                _Reader(samples),
                quant_format=QuantFormat.QDQ,
                nodes_to_exclude=last,
                **options,
            )
        except Exception as e:
            raise ExportError(f"int8 quantization of {base.name} failed: {e}\n{log.read()[-2000:]}") from e
    prepared.unlink(missing_ok=True)
    say("comparing int8 with fp32 on the held-out photos")
    agreement = top1_agreement(base.path, path, network_inputs(skimage_photos(HELD_OUT_PHOTOS), pre))
    meta = {
        **{k: v for k, v in base.meta.items() if k not in {"check", "sha256", "export_seconds", "exported_at", "files"}},
        "name": name,
        "base_model": base.name,
        "description": description,
        "precision": "int8",
        "exported_at": utc_now(),
        "export_seconds": round(time.perf_counter() - started, 1),
        "versions": versions(),
        "quantization": {
            "tool": "onnxruntime.quantization.quantize_static",
            "format": "QDQ",
            "activation_type": "QUInt8",
            "weight_type": "QInt8",
            "per_channel": True,
            "calibration_method": "MinMax",
            "float_nodes": last,
            "calibration_photos": sources,
            "calibration_samples": len(samples),
            "base_sha256": base.meta.get("sha256"),
            "top1_agreement_with_fp32": agreement,
            "agreement_photos": [f"skimage.data.{n}" for n in HELD_OUT_PHOTOS],
        },
        "sha256": sha256_file(path),
    }
    return path, meta


def _output_nodes(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    outputs = {o.name for o in model.graph.output}
    return [n.name for n in model.graph.node if outputs.intersection(n.output)]


def calibration_photos(paths: list[Path] | None) -> tuple[list[Image.Image], list[str]]:
    """RGB photos and where they came from: the given files, else scikit-image's calibration photos."""
    if paths:
        return [_rgb(Image.open(p)) for p in paths], [Path(p).name for p in paths]
    return skimage_photos(CALIBRATION_PHOTOS), [f"skimage.data.{n}" for n in CALIBRATION_PHOTOS]


def skimage_photos(names: tuple[str, ...]) -> list[Image.Image]:
    """scikit-image's bundled photos by name, as RGB images."""
    try:
        import skimage.data
    except ImportError as e:
        raise ExportError("int8 quantisation needs scikit-image for its sample photos: pip install scikit-image") from e
    return [_rgb(Image.fromarray(getattr(skimage.data, n)())) for n in names]


def held_out_pixels(pre: Preprocessing, jpegs: Sequence[Path] = ()) -> tuple[list[str], np.ndarray]:
    """Photos to compare precisions on, as uint8 network pixels with their names: `jpegs` decoded as a
    client's upload is (tests/data's, made from held-out photos), then the held-out scikit-image photos."""
    pixels = [imaging.decode(Path(p).read_bytes(), pre) for p in jpegs]
    pixels += [imaging.resize_crop(im, pre) for im in skimage_photos(HELD_OUT_PHOTOS)]
    return [Path(p).name for p in jpegs] + [f"skimage.data.{n}" for n in HELD_OUT_PHOTOS], np.stack(pixels)


def network_inputs(photos: list[Image.Image], pre: Preprocessing) -> np.ndarray:
    """Each photo and its mirror image (twice the statistics for free) as normalised float32 NCHW: exactly the
    pixels serving computes (imaging.resize_crop), normalised as the served graph's front does."""
    pixels = [imaging.resize_crop(im, pre) for p in photos for im in (p, p.transpose(Image.FLIP_LEFT_RIGHT))]
    return imaging.normalize(np.stack(pixels), pre)


def _rgb(image: Image.Image) -> Image.Image:
    image.load()
    return image.convert("RGB")


def top1_agreement(fp32: Path, int8: Path, samples: np.ndarray) -> float:
    return float(np.mean(predict(fp32, samples).argmax(1) == predict(int8, samples).argmax(1)))


def predict(path: Path, samples: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: b})[0] for b in _batches(samples)])


def _batches(samples: np.ndarray) -> Iterator[np.ndarray]:
    for i in range(0, len(samples), CALIBRATION_BATCH):
        yield samples[i : i + CALIBRATION_BATCH]


class _Reader(CalibrationDataReader):
    """onnxruntime CalibrationDataReader: feeds the samples in small batches."""

    def __init__(self, samples: np.ndarray) -> None:
        self._batches = _batches(samples)

    def get_next(self) -> dict[str, Any] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}
