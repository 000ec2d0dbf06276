"""How a photo becomes a network's input, as data: the one definition that serving, device decode and
int8 calibration all follow (inference/imaging.py applies it on the CPU, runtime/torch/imaging.py on a GPU).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How a photo becomes the network's input: resize the shorter side, centre-crop, normalise.

    mean/std are on the [0, 1] pixel scale, RGB order.
    """

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bilinear"  # "bilinear" | "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def resize_size(self) -> int:
        """Shorter side after resizing, before the centre crop (timm's convention)."""
        return int(math.floor(self.input_size / self.crop_pct))

    def pixel_affine(self) -> tuple[np.ndarray, np.ndarray]:
        """The normalisation of uint8 pixels as one multiply-add per channel, float32 [3] each:
        (x / 255 - mean) / std = x * scale + shift. The one definition every network front computes
        (imaging.normalize, the ONNX Runtime and torch runners, OpenVINO's PrePostProcessor)."""
        std = np.asarray(self.std, np.float64)
        mean = np.asarray(self.mean, np.float64)
        return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["resize_size"] = self.resize_size
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(
            input_size=int(d["input_size"]),
            crop_pct=float(d["crop_pct"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d["std"]),  # type: ignore[arg-type]
        )
