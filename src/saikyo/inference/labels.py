"""ImageNet-1k class names, index -> human label.

The names ship as data (imagenet_classes.txt, one per line, generated once from torchvision's
offline weight metadata) so that serving never needs torch.
"""

from __future__ import annotations

from importlib import resources


def _load() -> tuple[str, ...]:
    text = resources.files("saikyo.inference").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(line for line in text.splitlines() if line)
    if len(names) != 1000:
        raise RuntimeError(f"imagenet_classes.txt holds {len(names)} names, expected 1000")
    return names


NAMES: tuple[str, ...] = _load()


def name(index: int) -> str:
    """The class name for an ImageNet-1k index; IndexError outside 0..999."""
    if not 0 <= index < len(NAMES):
        raise IndexError(f"class index {index} outside 0..{len(NAMES) - 1}")
    return NAMES[index]
