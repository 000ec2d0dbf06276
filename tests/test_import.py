"""`saikyo models import`: classifiers from other toolchains, built here, imported with the real command,
served by the real server and asked through /classify?labels=true and v2 for 1 and 8 images; every answer
must equal the source framework's own on the same pixels. Bad input exits 2 and writes nothing."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from foreign_models import conv_classifier, feature_map, photos_as_jpegs, token_ids, two_inputs
from onnx import TensorProto
from serverproc import ServerProcess, running_server

from saikyo.inference import imaging
from saikyo.inference.predictions import softmax
from saikyo.inference.preprocessing import Preprocessing
from saikyo.models.repository import ModelRepository

# Eight photos the models have never seen, as JPEG uploads: one request of 1, one of 8.
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "camera", "immunohistochemistry", "hubble_deep_field", "retina")
# Served probabilities vs the source framework's on the same pixels: float32 rounding (fused ops, another
# batch size) moves them by ~1e-6; a wrong channel order, scale or layout moves them by > 1e-2.
TOLERANCE = 1e-4
FLOWERS = ["daisy", "dandelion", "rose", "sunflower", "tulip"]


def saikyo(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAIKYO_")}
    env["COLUMNS"] = "400"  # one line per message, for matching
    return subprocess.run([sys.executable, "-m", "saikyo", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def imported(repo: Path, name: str, source: Path, *flags: str | Path) -> dict:
    done = saikyo("models", "import", name, source, "--repository", repo, *flags)
    assert done.returncode == 0, done.stderr
    return ModelRepository(repo).resolve(name).meta


def listing(root: Path) -> list[tuple[str, int]]:
    """Every path under `root`, hidden ones included, with its size: what "unchanged" compares."""
    if not root.exists():
        return []
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*"))


def served_pixels(meta: dict, blobs: list[bytes]) -> np.ndarray:
    """The uint8 pixels the server decodes for these uploads, by the preprocessing the import stored."""
    pre = Preprocessing.from_dict(meta["preprocessing"])
    return np.stack([imaging.decode(b, pre) for b in blobs])


def onnx_source(path: Path, layout: str, scale: float, mean, std, bgr: bool = False, probabilities: bool = False, batch: int | None = 1):
    """The original file in ONNX Runtime, fed the way its author documents it: pixels * scale, minus mean,
    over std, in the model's channel order and layout."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    dtype = np.float16 if spec.type == "tensor(float16)" else np.float32

    def probs(pixels: np.ndarray) -> np.ndarray:
        x = pixels.astype(np.float64)
        if bgr:
            x = x[..., ::-1]
        x = (x * scale - np.asarray(mean)) / np.asarray(std)
        if layout == "nchw":
            x = x.transpose(0, 3, 1, 2)
        x = np.ascontiguousarray(x.astype(dtype))
        step = batch or len(x)
        out = np.concatenate([session.run(None, {spec.name: x[i : i + step]})[0] for i in range(0, len(x), step)]).astype(np.float32)
        return out if probabilities else softmax(out)

    return probs


def ask_classify(server: ServerProcess, model: str, blobs: list[bytes], k: int) -> list[dict[str, float]]:
    files = [("images", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]
    response = httpx.post(f"{server.url}/classify", params={"model": model, "topk": k, "labels": "true"}, files=files, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def ask_v2(server: ServerProcess, model: str, blobs: list[bytes], k: int) -> tuple[np.ndarray, list[str]]:
    images = {"name": "images", "datatype": "BYTES", "shape": [len(blobs)], "data": [base64.b64encode(b).decode() for b in blobs]}
    url = f"{server.url}/v2/models/{model}/infer"
    full = httpx.post(url, json={"inputs": [images], "outputs": [{"name": "probabilities"}]}, timeout=120)
    ranked = httpx.post(url, json={"inputs": [images], "outputs": [{"name": "probabilities", "parameters": {"classification": k}}]}, timeout=120)
    assert full.status_code == 200 and ranked.status_code == 200, (full.text, ranked.text)
    (out,) = full.json()["outputs"]
    return np.asarray(out["data"], np.float32).reshape(out["shape"]), ranked.json()["outputs"][0]["data"]


def check_answers(
    server: ServerProcess,
    model: str,
    meta: dict,
    blobs: list[bytes],
    source: Callable[[np.ndarray], np.ndarray],
    labels: list[str] | None,
    tolerance: float = TOLERANCE,
) -> None:
    """1 and 8 images per request, /classify?labels=true and v2 (tensor and classification extension):
    each probability within TOLERANCE of the source's, each class named by the model's own labels."""
    k = meta["num_classes"]
    for count in (1, 8):
        chosen = blobs[:count]
        want = source(served_pixels(meta, chosen))
        assert want.shape == (count, k)
        answers = ask_classify(server, model, chosen, k)
        assert len(answers) == count
        for row, answer in zip(want, answers):
            got = np.zeros(k, np.float32)
            for key, value in answer.items():
                index, _, label = key.partition(":")
                assert label == (labels[int(index)] if labels else ""), key
                got[int(index)] = value
            np.testing.assert_allclose(got, row, atol=tolerance)
        probs, strings = ask_v2(server, model, chosen, k)
        np.testing.assert_allclose(probs, want, atol=tolerance)
        assert len(strings) == count * k
        for j, text in enumerate(strings):
            score, index, *label = text.split(":", 2)
            assert label == ([labels[int(index)]] if labels else []), text
            assert abs(float(score) - want[j // k, int(index)]) <= tolerance + 1e-6  # printed with six decimals


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return photos_as_jpegs(PHOTOS)


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("foreign")
    files = {
        # A TensorFlow-style export: NHWC, batch fixed at 1 (also in a flatten's Reshape), odd I/O names.
        "nhwc": conv_classifier(layout="nhwc", batch=1),
        # Ends in Softmax, takes BGR in 0..255 minus Caffe-style means: served probabilities must not be squashed twice.
        "softmax": conv_classifier(layout="nchw", batch="batch", softmax=True, size=40, seed=1),
        # float16 throughout, dynamic batch.
        "half": conv_classifier(layout="nhwc", batch="n", dtype=TensorProto.FLOAT16, seed=2, classes=7),
    }
    for name, model in files.items():
        onnx.save(model, str(d / f"{name}.onnx"))
    (d / "flowers.txt").write_text("\n".join(FLOWERS) + "\n")
    (d / "flowers.json").write_text(json.dumps({str(i): n for i, n in enumerate(FLOWERS)}))
    return {name: d / f"{name}.onnx" for name in files} | {"labels_txt": d / "flowers.txt", "labels_json": d / "flowers.json"}


CAFFE_MEAN, CAFFE_STD = (103.94, 116.78, 123.68), (57.0, 57.0, 58.0)  # BGR order, 0..255 scale


@pytest.fixture(scope="module")
def onnx_repository(tmp_path_factory: pytest.TempPathFactory, foreign: dict[str, Path]) -> tuple[Path, dict[str, dict]]:
    repo = tmp_path_factory.mktemp("import-repository")
    metas = {
        "flowers": imported(repo, "flowers", foreign["nhwc"], "--labels", foreign["labels_txt"]),
        "caffe": imported(
            repo, "caffe", foreign["softmax"], "--labels", foreign["labels_json"], "--channel-order", "bgr", "--scale", "1",
            "--mean", ",".join(map(str, CAFFE_MEAN)), "--std", ",".join(map(str, CAFFE_STD)), "--interpolation", "bicubic",
        ),  # fmt: skip
        "half": imported(repo, "half", foreign["half"], "--crop-pct", "1.0"),
    }
    return repo, metas


@pytest.fixture(scope="module")
def onnx_server(onnx_repository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo, _ = onnx_repository
    with running_server(repo, "flowers,caffe,half", tmp_path_factory.mktemp("logs")) as server:
        yield server


def test_nhwc_fixed_batch_of_one_is_served_in_batches(onnx_repository, onnx_server, foreign, photos) -> None:
    _, metas = onnx_repository
    meta = metas["flowers"]
    assert meta["family"] == "imported" and meta["source"] == "onnx" and meta["layout"] == "nhwc"
    assert meta["inputs"][0]["shape"] == [-1, 3, 32, 32] and meta["labels"] == "labels.txt"
    assert any("fixed batch of 1 made symbolic" in n for n in meta["import_notes"])
    assert "serving" not in meta
    from saikyo.inference.preprocessing import IMAGENET_MEAN, IMAGENET_STD

    source = onnx_source(foreign["nhwc"], "nhwc", 1 / 255, IMAGENET_MEAN, IMAGENET_STD, batch=1)
    check_answers(onnx_server, "flowers", meta, photos, source, FLOWERS)


def test_softmax_at_the_end_bgr_and_pixel_scale(onnx_repository, onnx_server, foreign, photos) -> None:
    _, metas = onnx_repository
    meta = metas["caffe"]
    assert meta["output"] == "probabilities" and "final Softmax removed: the server applies softmax once" in meta["import_notes"]
    assert meta["preprocessing_source"]["channel_order"] == "bgr" and meta["preprocessing"]["interpolation"] == "bicubic"
    source = onnx_source(foreign["softmax"], "nchw", 1.0, CAFFE_MEAN, CAFFE_STD, bgr=True, probabilities=True, batch=None)
    check_answers(onnx_server, "caffe", meta, photos, source, FLOWERS)


def test_float16_model_without_labels_answers_indices_and_says_so(onnx_repository, onnx_server, foreign, photos) -> None:
    _, metas = onnx_repository
    meta = metas["half"]
    from saikyo.inference.preprocessing import IMAGENET_MEAN, IMAGENET_STD

    source = onnx_source(foreign["half"], "nhwc", 1 / 255, IMAGENET_MEAN, IMAGENET_STD, batch=None)
    # The network computes in float16 (3 significant digits): inputs normalised in float32 here and in
    # float64 there round to neighbouring float16 values now and then.
    check_answers(onnx_server, "half", meta, photos, source, None, tolerance=2e-3)
    parameters = httpx.get(f"{onnx_server.url}/v2/models/half").json()["parameters"]
    assert parameters["labels"].startswith("none") and "indices" in parameters["labels"]
    assert httpx.get(f"{onnx_server.url}/v2/models/flowers").json()["parameters"]["labels"] == "labels.txt (5 classes)"


def test_list_info_and_local_classify_show_imported_models(onnx_repository, tmp_path: Path) -> None:
    repo, _ = onnx_repository
    rows = {r["name"]: r for r in json.loads(saikyo("models", "list", "--repository", repo, "--json").stdout)}
    assert rows["flowers"]["family"] == "imported" and rows["flowers"]["source"] == "onnx"
    assert rows["flowers"]["num_classes"] == 5 and rows["flowers"]["labels"] == "labels.txt"
    info = json.loads(saikyo("models", "info", "flowers", "--repository", repo).stdout)
    assert info["zoo"] is None and info["meta"]["files"].keys() == {"model.onnx", "labels.txt"}
    cat = tmp_path / "cat.jpg"
    cat.write_bytes(photos_as_jpegs(("chelsea",))[0])
    table = saikyo("classify", cat, "--model", "flowers", "--topk", "5", "--repository", repo)
    assert table.returncode == 0, table.stderr
    assert all(name in table.stdout for name in FLOWERS)


# ---- bad input: exit 2, a message naming what was found and what was expected, nothing written ----


def _hf_without_mean(d: Path) -> Path:
    path = d / "preprocessor_config.json"
    path.write_text(json.dumps({"image_processor_type": "ViTImageProcessor", "size": {"height": 32, "width": 32}, "image_std": [0.5, 0.5, 0.5]}))
    return path


BAD = {
    "two inputs": (lambda d: _save(d, two_inputs()), [], ["2 inputs", "expected one image input"]),
    "token ids": (lambda d: _save(d, token_ids()), [], ["'input_ids' int64[N, 16]", "expected an image"]),
    "dynamic size": (lambda d: _save(d, conv_classifier(size="S")), [], ["height and width are dynamic", "--size"]),
    "feature map out": (lambda d: _save(d, feature_map()), [], ["'features' float[N, 8, 16, 16]", "expected float32 or float16 [N, K]"]),
    "labels of the wrong length": (lambda d: _save(d, conv_classifier()), ["--labels", "FOUR"], ["holds 4 labels; the model has 5 classes"]),
    "truncated file": (lambda d: _truncated(d), [], ["not a readable ONNX model"]),
    "preprocessing without a needed key": (lambda d: _save(d, conv_classifier()), ["--preprocessing", "HF"], ["has no 'image_mean'"]),
    "preprocessing of another size": (lambda d: _save(d, conv_classifier()), ["--size", "64"], ["--size 64 does not match", "fixed at 32"]),
}


def _save(d: Path, model: onnx.ModelProto) -> Path:
    path = d / "model.onnx"
    onnx.save(model, str(path))
    return path


def _truncated(d: Path) -> Path:
    path = _save(d, conv_classifier())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_and_writes_nothing(case: str, onnx_repository, tmp_path: Path) -> None:
    repo, _ = onnx_repository
    make, flags, expected = BAD[case]
    (tmp_path / "four.txt").write_text("a\nb\nc\nd\n")
    flags = [{"FOUR": str(tmp_path / "four.txt"), "HF": str(_hf_without_mean(tmp_path))}.get(f, f) for f in flags]
    source = make(tmp_path)
    before = listing(repo)
    done = saikyo("models", "import", "flowers", source, "--repository", repo, *flags)
    message = " ".join(done.stderr.split())
    assert done.returncode == 2, done.stderr
    for fragment in expected:
        assert fragment in message, message
    assert "nothing was written" in message
    assert listing(repo) == before


def test_error_on_a_new_repository_leaves_no_directory(tmp_path: Path) -> None:
    repo = tmp_path / "fresh"
    done = saikyo("models", "import", "mine", _save(tmp_path, two_inputs()), "--repository", repo)
    assert done.returncode == 2 and not repo.exists()
    done = saikyo("models", "import", "resnet50", _save(tmp_path, conv_classifier()), "--repository", repo)
    assert done.returncode == 2 and "zoo model's name" in done.stderr and not repo.exists()
