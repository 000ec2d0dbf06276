"""An imported model's preprocessing, from flags or from the files people have: a Hugging Face
preprocessor_config.json or timm's pretrained_cfg JSON.

Serving has one preprocessing (inference/preprocessing.py): resize the shorter side, centre-crop a square,
pixels / 255, (x - mean) / std in RGB. Whatever the model wants is expressed in it: another pixel scale
(`rescale_factor`, `--scale`) folds into mean and std, so the runners' uint8 front stays what the zoo has;
a BGR order is a channel swap at the front of the graph (models/onnx_import.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from saikyo.inference.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from saikyo.models.errors import ImportRejected
from saikyo.models.label_files import read_text

MAX_FILE_BYTES = 1 << 20
INTERPOLATIONS = ("bilinear", "bicubic")
CHANNEL_ORDERS = ("rgb", "bgr")
# PIL's resample numbers, as Hugging Face image processors store them.
_HF_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
DEFAULT_CROP_PCT = 0.875


@dataclass
class PreprocessingSpec:
    """Everything the user said (a file, then flags over it); None = not said."""

    size: int | None = None
    resize_size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    channel_order: str | None = None
    scale: float | None = None  # pixels 0..255 times this, before mean/std
    source: str = "defaults"
    notes: list[str] = field(default_factory=list)

    def over(self, base: "PreprocessingSpec") -> "PreprocessingSpec":
        """These values where given, `base`'s elsewhere."""
        merged = PreprocessingSpec(source=base.source, notes=[*base.notes, *self.notes])
        for name in ("size", "resize_size", "crop_pct", "interpolation", "mean", "std", "channel_order", "scale"):
            mine = getattr(self, name)
            setattr(merged, name, mine if mine is not None else getattr(base, name))
        if self.resize_size is not None:
            merged.crop_pct = None  # one of the two says how much is cropped: the flag given wins
        elif self.crop_pct is not None:
            merged.resize_size = None
        if any(getattr(self, n) is not None for n in ("size", "resize_size", "crop_pct", "interpolation", "mean", "std", "channel_order", "scale")):
            merged.source = f"{base.source} and flags" if base.source != "defaults" else "flags"
        return merged

    def resolve(self, model_size: int) -> tuple[Preprocessing, str, dict[str, Any]]:
        """Serving's Preprocessing, the channel order, and what was asked, for meta.json."""
        size = self.size or model_size
        if size != model_size:
            raise ImportRejected(f"the preprocessing crops {size}x{size}; the model's input is {model_size}x{model_size}")
        interpolation = self.interpolation or "bilinear"
        if interpolation not in INTERPOLATIONS:
            raise ImportRejected(f"interpolation {interpolation!r} is not served; expected one of {', '.join(INTERPOLATIONS)} (pass --interpolation to choose)")
        if self.resize_size is not None:
            if self.resize_size < size:
                raise ImportRejected(f"resize size {self.resize_size} is smaller than the crop {size}")
            # A hair under size / resize_size, so that Preprocessing.resize_size floors back to it exactly.
            crop_pct = size / (self.resize_size + 1e-6)
        else:
            crop_pct = self.crop_pct if self.crop_pct is not None else DEFAULT_CROP_PCT
        if not 0.05 <= crop_pct <= 1.0:
            raise ImportRejected(f"crop fraction {crop_pct:g} is outside 0.05..1")
        scale = self.scale if self.scale is not None else 1 / 255
        mean = self.mean if self.mean is not None else IMAGENET_MEAN
        std = self.std if self.std is not None else IMAGENET_STD
        if not scale > 0 or any(not s > 0 for s in std) or not all(map(math.isfinite, (scale, *mean, *std))):
            raise ImportRejected(f"scale {scale:g} and std {list(std)} must be positive and finite, mean {list(mean)} finite")
        order = self.channel_order or "rgb"
        if order not in CHANNEL_ORDERS:
            raise ImportRejected(f"channel order {order!r}; expected rgb or bgr")
        # (p * scale - m) / s == (p / 255 - m / (255 scale)) / (s / (255 scale)): serving's front, other constants.
        factor = 255.0 * scale
        served_mean = tuple(m / factor for m in mean)
        served_std = tuple(s / factor for s in std)
        if order == "bgr":  # given in the model's channel order; serving normalises RGB before the swap
            served_mean, served_std = served_mean[::-1], served_std[::-1]
        pre = Preprocessing(input_size=size, crop_pct=crop_pct, interpolation=interpolation, mean=served_mean, std=served_std)  # type: ignore[arg-type]
        asked = {"source": self.source, "channel_order": order, "scale": scale, "mean": list(mean), "std": list(std), "notes": self.notes}
        return pre, order, asked


def triple(text: str, what: str) -> tuple[float, float, float]:
    """"0.5,0.5,0.5" -> (0.5, 0.5, 0.5); one value stands for all three channels."""
    try:
        values = [float(Fraction(v.strip())) for v in text.split(",")]
    except (ValueError, ZeroDivisionError):
        raise ImportRejected(f"--{what} {text!r}: expected three numbers, e.g. 0.485,0.456,0.406") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise ImportRejected(f"--{what} {text!r}: expected three numbers (one per channel), got {len(values)}")
    return (values[0], values[1], values[2])


def number(text: str, what: str) -> float:
    """"1/255" or "0.0039" -> a float."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise ImportRejected(f"--{what} {text!r}: expected a number such as 1/255 or 1") from None


def read_file(path: Path) -> PreprocessingSpec:
    """A Hugging Face preprocessor_config.json or a timm pretrained_cfg, told apart by their keys."""
    text = read_text(path, MAX_FILE_BYTES, "preprocessing")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ImportRejected(f"preprocessing file {path} is not JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("pretrained_cfg"), dict):
        data = data["pretrained_cfg"]  # timm's config.json on the Hub nests it
    if not isinstance(data, dict):
        raise ImportRejected(f"preprocessing file {path} holds a JSON {type(data).__name__}; expected an object")
    if "image_mean" in data or "image_processor_type" in data or "feature_extractor_type" in data:
        return _hugging_face(data, path)
    if "input_size" in data or "mean" in data:
        return _timm(data, path)
    raise ImportRejected(
        f"preprocessing file {path} is neither a Hugging Face preprocessor_config.json (image_mean, image_std, size) "
        f"nor a timm pretrained_cfg (input_size, mean, std); found keys {sorted(data)[:8]}"
    )


def _need(data: dict[str, Any], key: str, path: Path, kind: str) -> Any:
    if key not in data:
        raise ImportRejected(f"preprocessing file {path} ({kind}) has no {key!r}; it is needed to preprocess like the model was trained")
    return data[key]


def _rgb3(value: Any, key: str, path: Path) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        value = [value] * 3
    if not isinstance(value, list) or len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
        raise ImportRejected(f"preprocessing file {path}: {key} is {value!r}; expected three numbers")
    return (float(value[0]), float(value[1]), float(value[2]))


def _side(value: Any, key: str, path: Path) -> tuple[int | None, int | None]:
    """HF sizes: an int, {"shortest_edge": s}, or {"height": h, "width": w} -> (shortest edge, square side)."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict):
        if isinstance(value.get("shortest_edge"), int):
            return value["shortest_edge"], None
        h, w = value.get("height"), value.get("width")
        if isinstance(h, int) and isinstance(w, int):
            if h != w:
                raise ImportRejected(f"preprocessing file {path}: {key} is {h}x{w}; only square inputs are served")
            return h, h
    raise ImportRejected(f"preprocessing file {path}: {key} is {value!r}; expected an int, {{shortest_edge}} or {{height, width}}")


def _hugging_face(data: dict[str, Any], path: Path) -> PreprocessingSpec:
    kind = "Hugging Face preprocessor_config.json"
    spec = PreprocessingSpec(source=f"Hugging Face {path.name}")
    if data.get("do_normalize", True):
        spec.mean = _rgb3(_need(data, "image_mean", path, kind), "image_mean", path)
        spec.std = _rgb3(_need(data, "image_std", path, kind), "image_std", path)
    else:
        spec.mean, spec.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    spec.scale = float(data.get("rescale_factor", 1 / 255)) if data.get("do_rescale", True) else 1.0
    resample = data.get("resample", 2)
    spec.interpolation = _HF_RESAMPLE.get(resample, str(resample)) if isinstance(resample, int) else str(resample)
    edge, square = _side(_need(data, "size", path, kind), "size", path)
    if data.get("do_center_crop", "crop_size" in data) and "crop_size" in data:
        _, crop = _side(data["crop_size"], "crop_size", path)
        spec.size = crop if crop is not None else edge
        spec.resize_size = edge
    elif "crop_pct" in data and edge is not None and square is None:
        spec.size, spec.crop_pct = edge, float(data["crop_pct"])  # ConvNeXt's processor: resize edge / crop_pct, crop edge
    else:
        spec.size, spec.crop_pct = square or edge, 1.0
        if square is not None and data.get("do_resize", True):
            spec.notes.append("resized to a square without crop in the original; served as shorter side + centre crop")
    return spec


def _timm(data: dict[str, Any], path: Path) -> PreprocessingSpec:
    kind = "timm pretrained_cfg"
    spec = PreprocessingSpec(source=f"timm {path.name}")
    size = _need(data, "input_size", path, kind)
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) for v in size)):
        raise ImportRejected(f"preprocessing file {path}: input_size is {size!r}; expected [3, H, W]")
    if size[1] != size[2]:
        raise ImportRejected(f"preprocessing file {path}: input_size is {size[1]}x{size[2]}; only square inputs are served")
    spec.size = size[1]
    spec.mean = _rgb3(_need(data, "mean", path, kind), "mean", path)
    spec.std = _rgb3(_need(data, "std", path, kind), "std", path)
    spec.crop_pct = float(data.get("crop_pct", DEFAULT_CROP_PCT))
    spec.interpolation = str(data.get("interpolation", "bilinear"))
    if data.get("crop_mode", "center") != "center":
        spec.notes.append(f"crop_mode {data['crop_mode']!r} served as a centre crop")
    return spec
