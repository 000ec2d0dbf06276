"""`saikyo models import`: classifiers from other toolchains, built here, imported with the real command,
served by the real server and asked through /classify?labels=true and v2 for 1 and 8 images; every answer
must equal the source framework's own on the same pixels. Bad input exits 2 and writes nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import onnx
import pytest
from support.foreign_models import conv_classifier, feature_map, photos_as_jpegs, token_ids, two_inputs
from support.importing import PHOTOS, ask_classify, check_answers, imported, listing, onnx_source, saikyo
from onnx import TensorProto
from support.serverproc import ServerProcess, running_server

from saikyo.inference.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from saikyo.models.repository import ModelRepository

FLOWERS = ["daisy", "dandelion", "rose", "sunflower", "tulip"]


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
        # A batch of 1 the graph cannot be freed of: served one image per forward pass.
        "fixed": conv_classifier(layout="nchw", batch=1, shared_shape=True, seed=3),
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
    calibration = tmp_path_factory.mktemp("calibration")
    for name, jpeg in zip(("coins", "moon", "grass", "brick"), photos_as_jpegs(("coins", "moon", "grass", "brick"))):
        (calibration / f"{name}.jpg").write_bytes(jpeg)
    metas = {
        "flowers": imported(
            repo, "flowers", foreign["nhwc"], "--labels", foreign["labels_txt"], "--quantize", "int8", "--calibration-dir", calibration
        ),
        "caffe": imported(
            repo, "caffe", foreign["softmax"], "--labels", foreign["labels_json"], "--channel-order", "bgr", "--scale", "1",
            "--mean", ",".join(map(str, CAFFE_MEAN)), "--std", ",".join(map(str, CAFFE_STD)), "--interpolation", "bicubic",
        ),  # fmt: skip
        "half": imported(repo, "half", foreign["half"], "--crop-pct", "1.0"),
        "fixed": imported(repo, "fixed", foreign["fixed"]),
    }
    return repo, metas


@pytest.fixture(scope="module")
def onnx_server(onnx_repository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo, _ = onnx_repository
    with running_server(repo, "flowers,caffe,half,flowers-int8,fixed", tmp_path_factory.mktemp("logs")) as server:
        yield server


def test_nhwc_fixed_batch_of_one_is_served_in_batches(onnx_repository, onnx_server, foreign, photos) -> None:
    _, metas = onnx_repository
    meta = metas["flowers"]
    assert meta["family"] == "imported" and meta["source"] == "onnx" and meta["layout"] == "nhwc"
    assert meta["inputs"][0]["shape"] == [-1, 3, 32, 32] and meta["labels"] == "labels.txt"
    assert any("fixed batch of 1 made symbolic" in n for n in meta["import_notes"])
    assert "serving" not in meta
    source = onnx_source(foreign["nhwc"], "nhwc", 1 / 255, IMAGENET_MEAN, IMAGENET_STD, batch=1)
    check_answers(onnx_server, "flowers", meta, photos, source, FLOWERS)


def test_softmax_at_the_end_bgr_and_pixel_scale(onnx_repository, onnx_server, foreign, photos) -> None:
    _, metas = onnx_repository
    meta = metas["caffe"]
    assert meta["output"] == "probabilities" and "final Softmax removed: the server applies softmax once" in meta["import_notes"]
    assert meta["preprocessing_source"]["channel_order"] == "bgr" and meta["preprocessing"]["interpolation"] == "bicubic"
    source = onnx_source(foreign["softmax"], "nchw", 1.0, CAFFE_MEAN, CAFFE_STD, bgr=True, probabilities=True, batch=None)
    check_answers(onnx_server, "caffe", meta, photos, source, FLOWERS)


def test_a_batch_the_graph_cannot_free_is_served_one_image_per_pass(onnx_repository, onnx_server, foreign, photos) -> None:
    _, metas = onnx_repository
    meta = metas["fixed"]
    assert meta["serving"] == {"max_batch_size": 1} and meta["inputs"][0]["shape"] == [1, 3, 32, 32]
    assert "the graph only takes a batch of 1: it is served with max_batch_size 1" in meta["import_notes"]
    source = onnx_source(foreign["fixed"], "nchw", 1 / 255, IMAGENET_MEAN, IMAGENET_STD, batch=1)
    check_answers(onnx_server, "fixed", meta, photos, source, None)


def test_float16_model_without_labels_answers_indices_and_says_so(onnx_repository, onnx_server, foreign, photos) -> None:
    _, metas = onnx_repository
    meta = metas["half"]
    source = onnx_source(foreign["half"], "nhwc", 1 / 255, IMAGENET_MEAN, IMAGENET_STD, batch=None)
    # The network computes in float16 (3 significant digits): inputs normalised in float32 here and in
    # float64 there round to neighbouring float16 values now and then.
    check_answers(onnx_server, "half", meta, photos, source, None, tolerance=2e-3)
    parameters = httpx.get(f"{onnx_server.url}/v2/models/half").json()["parameters"]
    assert parameters["labels"].startswith("none") and "indices" in parameters["labels"]
    assert httpx.get(f"{onnx_server.url}/v2/models/flowers").json()["parameters"]["labels"] == "labels.txt (5 classes)"


def test_int8_variant_calibrated_on_your_photos_keeps_the_labels(onnx_repository, onnx_server, photos) -> None:
    repo, _ = onnx_repository
    meta = ModelRepository(repo).resolve("flowers-int8").meta
    assert meta["precision"] == "int8" and meta["labels"] == "labels.txt" and meta["base_model"] == "flowers"
    assert meta["quantization"]["calibration_photos"] == ["brick.jpg", "coins.jpg", "grass.jpg", "moon.jpg"]
    assert 0.0 <= meta["quantization"]["top1_agreement_with_fp32"] <= 1.0
    for answer in ask_classify(onnx_server, "flowers-int8", photos, 5):
        assert {key.partition(":")[2] for key in answer} == set(FLOWERS)
        assert abs(sum(answer.values()) - 1.0) < 1e-3


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
    "calibration photo that is not one": (
        lambda d: _save(d, conv_classifier()), ["--quantize", "int8", "--calibration-dir", "BADCAL"], ["notes.jpg is not a usable image"]
    ),
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
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "notes.jpg").write_text("not a photo")
    files = {"FOUR": tmp_path / "four.txt", "HF": _hf_without_mean(tmp_path), "BADCAL": tmp_path / "calibration"}
    flags = [str(files.get(f, f)) for f in flags]
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


@pytest.mark.slow
def test_import_to_s3_and_push_carry_the_labels(onnx_repository, foreign, s3_server, tmp_path: Path, photos) -> None:
    """`models import` publishes straight to s3:// (files, then meta.json), and `models push` of an import
    takes its labels along: a server on that bucket names the classes."""
    repo, metas = onnx_repository
    env = s3_server.env()
    endpoint = ("--s3-endpoint-url", s3_server.url)
    direct = saikyo("models", "import", "mine", foreign["softmax"], "--labels", foreign["labels_txt"], "--repository", "s3://models/imported", *endpoint, env=env)
    assert direct.returncode == 0, direct.stderr
    assert "imported mine version 1 into s3://models/imported" in " ".join(direct.stdout.split())
    pushed = saikyo("models", "push", "flowers", "--to", "s3://models/imported", "--repository", repo, *endpoint, env=env)
    assert pushed.returncode == 0 and "labels.txt" in pushed.stdout, pushed.stderr
    rows = {r["name"]: r for r in json.loads(saikyo("models", "list", "--repository", "s3://models/imported", *endpoint, "--json", env=env).stdout)}
    assert rows["mine"]["family"] == rows["flowers"]["family"] == "imported" and rows["flowers"]["labels"] == "labels.txt"
    with running_server("s3://models/imported", "mine,flowers", tmp_path / "logs", *endpoint, env=env) as server:  # type: ignore[arg-type]
        for model in ("mine", "flowers"):
            (answer,) = ask_classify(server, model, photos[:1], 5)
            assert {key.partition(":")[2] for key in answer} == set(FLOWERS)


# ---- preprocessing files: what each toolchain's keys become ----


def _pre(tmp_path: Path, doc: dict, **flags):
    from saikyo.models.preprocessing_files import PreprocessingSpec, read_file

    path = tmp_path / "pre.json"
    path.write_text(json.dumps(doc))
    return PreprocessingSpec(**flags).over(read_file(path))


def test_hugging_face_resize_then_crop_and_rescale_fold_into_mean_std(tmp_path: Path) -> None:
    doc = {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224},
           "do_center_crop": True, "resample": 2, "image_mean": [127.5] * 3, "image_std": [127.5] * 3, "rescale_factor": 1.0}  # fmt: skip
    pre, order, asked = _pre(tmp_path, doc).resolve(224)
    assert (pre.input_size, pre.resize_size, pre.interpolation, order) == (224, 256, "bilinear", "rgb")
    # (p * 1.0 - 127.5) / 127.5 == (p / 255 - 0.5) / 0.5
    assert pre.mean == pytest.approx((0.5,) * 3) and pre.std == pytest.approx((0.5,) * 3)
    assert asked["scale"] == 1.0 and asked["source"].startswith("Hugging Face")


def test_timm_config_and_flags_over_it(tmp_path: Path) -> None:
    doc = {"input_size": [3, 288, 288], "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "crop_pct": 0.95, "interpolation": "bicubic"}
    pre, _, _ = _pre(tmp_path, doc).resolve(288)
    assert (pre.input_size, pre.crop_pct, pre.interpolation, pre.mean) == (288, 0.95, "bicubic", (0.1, 0.2, 0.3))
    pre, order, asked = _pre(tmp_path, doc, resize_size=320, channel_order="bgr").resolve(288)
    assert pre.resize_size == 320 and order == "bgr" and asked["source"] == "timm pre.json and flags"
    assert pre.mean == pytest.approx((0.3, 0.2, 0.1))  # given in the model's (BGR) order, stored in serving's RGB


def test_unserved_resampling_is_refused_with_the_fix(tmp_path: Path) -> None:
    from saikyo.models.errors import ImportRejected

    doc = {"image_processor_type": "X", "size": 32, "resample": 1, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    with pytest.raises(ImportRejected, match="'lanczos' is not served.*--interpolation"):
        _pre(tmp_path, doc).resolve(32)
    pre, _, _ = _pre(tmp_path, doc, interpolation="bicubic").resolve(32)
    assert pre.interpolation == "bicubic"


def test_a_model_of_ones_own_not_yet_imported_is_pointed_at_import(tmp_path: Path) -> None:
    from saikyo.models.errors import ModelNotExported

    done = saikyo("serve", "--models", "flowers", "--repository", tmp_path)
    assert done.returncode == 2 and "saikyo models import flowers YOUR_MODEL.onnx" in done.stderr, done.stderr
    with pytest.raises(ModelNotExported, match="run: saikyo models import flowers YOUR_MODEL.onnx --labels LABELS_FILE --quantize int8"):
        ModelRepository(tmp_path).resolve("flowers-int8")
