"""ImageNet-1k class names ship as data: no torch needed."""

from __future__ import annotations

import pytest

from saikyo.inference import labels


def test_cat_classes() -> None:
    assert labels.name(281) == "tabby"
    assert labels.name(282) == "tiger cat"
    assert labels.name(285) == "Egyptian cat"


def test_thousand_distinct_names() -> None:
    assert len(labels.NAMES) == 1000 and len(set(labels.NAMES)) == 1000
    assert labels.NAMES[0] == "tench" and labels.NAMES[999] == "toilet tissue"


@pytest.mark.parametrize("index", [-1, 1000])
def test_out_of_range(index: int) -> None:
    with pytest.raises(IndexError):
        labels.name(index)
