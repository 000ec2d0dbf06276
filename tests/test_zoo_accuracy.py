"""Published accuracy: every zoo entry names its weights' ImageNet-1k top-1 and where it is published, and
records carry it marked as published for those weights (a run on other weights measures speed only)."""

from __future__ import annotations

import pytest

from saikyo.bench.records import NAMED_WEIGHTS, accuracy_fields
from saikyo.models import zoo


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_every_zoo_entry_has_a_published_accuracy_with_its_source(name: str) -> None:
    accuracy = zoo.ZOO[name].accuracy
    assert accuracy is not None
    assert 50 < accuracy.top1 < 90
    assert accuracy.top5 is None or accuracy.top1 < accuracy.top5 < 100
    assert accuracy.weights and "https://" in accuracy.source
    assert zoo.ZOO[name].to_dict()["accuracy"]["top1"] == accuracy.top1


def test_sources_that_are_not_torchvision() -> None:
    lite0, caffenet = zoo.ZOO["efficientnet_lite0"].accuracy, zoo.ZOO["caffenet"].accuracy
    assert (lite0.top1, lite0.top5) == (75.1, None)  # the release gives FP32 top-1 only
    assert "tensorflow/tpu" in lite0.source
    assert (caffenet.top1, caffenet.top5) == (57.4, 80.4)
    assert "bvlc_reference_caffenet" in caffenet.source


def test_torchvision_entries_match_the_weights_enums_they_name() -> None:
    torchvision = pytest.importorskip("torchvision")
    checked = 0
    for spec in zoo.ZOO.values():
        if not spec.builder.startswith("torchvision."):
            continue
        builder = getattr(torchvision.models, spec.builder.partition(":")[2])
        default = torchvision.models.get_model_weights(builder).DEFAULT  # what --weights imagenet downloads
        named = f"{type(default).__name__}.{default.name}"
        assert spec.accuracy is not None and spec.accuracy.weights == f"torchvision {named}"
        assert named in spec.weights_source and named in spec.accuracy.source
        metrics = default.meta["_metrics"]["ImageNet-1K"]
        assert (spec.accuracy.top1, spec.accuracy.top5) == (metrics["acc@1"], metrics["acc@5"])
        checked += 1
    assert checked == 5


def test_records_say_whether_the_run_served_the_named_weights() -> None:
    named = accuracy_fields("resnet50", NAMED_WEIGHTS)
    assert (named["published_top1"], named["published_top5"], named["speed_only"]) == (80.858, 95.434, False)
    assert named["published_for"] == "torchvision ResNet50_Weights.IMAGENET1K_V2"
    assert accuracy_fields("resnet50", "random")["speed_only"] is True
    assert accuracy_fields("caffenet", "file:abc")["speed_only"] is True  # a file the zoo cannot vouch for
    # int8: its fp32 weights' numbers; no agreement known without the entry's meta.json.
    int8 = accuracy_fields("resnet50-int8", "random")
    assert int8["published_top1"] == 80.858 and int8["top1_agreement_with_fp32"] is None
    # Not a zoo network: nothing published.
    assert set(accuracy_fields("tiny", "random").values()) == {None}


def test_int8_agreement_and_whether_its_photos_were_held_out_of_calibration() -> None:
    calibration = ["skimage.data.coins", "skimage.data.moon"]
    held_out = {"top1_agreement_with_fp32": 0.9, "calibration_photos": calibration,
                "agreement_photos": ["skimage.data.chelsea", "skimage.data.coffee", "skimage.data.rocket"]}  # fmt: skip
    fields = accuracy_fields("resnet50-int8", "random", held_out)
    assert (fields["top1_agreement_with_fp32"], fields["agreement_photos"], fields["agreement_held_out"]) == (0.9, 3, True)
    # Overlapping sets are not held out.
    overlap = {**held_out, "agreement_photos": ["skimage.data.coins", "skimage.data.chelsea"]}
    assert accuracy_fields("resnet50-int8", "random", overlap)["agreement_held_out"] is False
    # Entries that compared on the calibration photos themselves (no agreement_photos) say so.
    same = {"top1_agreement_with_fp32": 1.0, "calibration_photos": calibration}
    fields = accuracy_fields("resnet50-int8", "random", same)
    assert (fields["agreement_photos"], fields["agreement_held_out"]) == (2, False)
