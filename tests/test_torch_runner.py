"""The torch runner and device-side decode: bucketing, padding, agreement with ONNX Runtime and Pillow.

Everything runs on the CPU (the same code paths the GPU takes, minus CUDA graphs); the tests marked
`gpu` run the CUDA paths and skip cleanly where torch sees no CUDA device.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from support.paths import CAT, CAT_CLASSES, DATA
from PIL import Image
from support.serverproc import running_server

from saikyo.runtime.torch import imaging as torch_imaging
from saikyo.inference import imaging
from saikyo.models import zoo
from saikyo.inference.batching import DynamicBatcher
from saikyo.models.export import export_model
from saikyo.models.repository import WEIGHTS_FILE, ModelRepository
from saikyo.runtime import RunnerError, auto_backend, load_runner, runner_inputs
from saikyo.runtime.onnxruntime import OnnxRunner
from saikyo.runtime.torch.runner import TorchRunner, bucket_for, bucket_sizes, resolve_device, resolve_dtype
from saikyo.settings import Settings

PHOTOS = [DATA / "cat.jpg", DATA / "coffee.jpg", DATA / "astronaut.jpg"]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def assert_same_network(got: np.ndarray, want: np.ndarray) -> None:
    """Probabilities from two runtimes of the same weights: compare log-probabilities (= logits up to a
    per-row constant), relative to their spread, so near-uniform random-weight outputs still discriminate."""
    assert got.shape == want.shape and got.dtype == np.float32
    lg, lw = np.log(got.astype(np.float64)), np.log(want.astype(np.float64))
    lg -= lg.mean(axis=1, keepdims=True)
    lw -= lw.mean(axis=1, keepdims=True)
    spread = float(np.ptp(lw, axis=1).max())
    assert spread > 0
    assert float(np.abs(lg - lw).max()) <= 1e-3 * spread + 1e-5


@pytest.fixture(scope="module")
def squeezenet_repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    repo = ModelRepository(tmp_path_factory.mktemp("torch-repository"))
    export_model("squeezenet1_1", repo, weights="random")
    return repo


def settings_for(repo: ModelRepository, **kw: object) -> Settings:
    return Settings(repository=repo.root, models=("squeezenet1_1",), **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def squeezenet_pair(squeezenet_repository: ModelRepository) -> tuple[TorchRunner, OnnxRunner]:
    s = settings_for(squeezenet_repository, max_batch_size=4, device="cpu")
    return TorchRunner.load(*runner_inputs("squeezenet1_1", s)), OnnxRunner.load(*runner_inputs("squeezenet1_1", s))


def random_pixels(n: int, seed: int = 0, size: int = 224) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---- buckets ----
def test_buckets_are_capped_by_the_max_batch_size_which_is_always_one() -> None:
    assert bucket_sizes((1, 2, 4, 8, 16, 32), 16) == (1, 2, 4, 8, 16)
    assert bucket_sizes((1, 2, 4, 8, 16, 32), 24) == (1, 2, 4, 8, 16, 24)
    assert bucket_sizes((8, 1, 64), 256) == (1, 8, 64, 256)
    assert bucket_sizes((), 5) == (5,)
    with pytest.raises(ValueError):
        bucket_sizes((1, 2), 0)


def test_a_batch_goes_to_the_smallest_bucket_that_holds_it() -> None:
    sizes = (1, 2, 4, 8, 16, 24)
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 4, 5, 9, 16, 17, 24)] == [1, 2, 4, 4, 8, 16, 16, 24, 24]
    with pytest.raises(ValueError, match="largest bucket"):
        bucket_for(25, sizes)


def test_batch_buckets_setting_from_env() -> None:
    s = Settings.from_env({"SAIKYO_BATCH_BUCKETS": "1, 8,64", "SAIKYO_CUDA_GRAPHS": "off", "SAIKYO_TORCH_DTYPE": "bf16"})
    assert s.batch_buckets == (1, 8, 64) and s.cuda_graphs is False and s.torch_dtype == "bf16"
    with pytest.raises(ValueError, match="positive integers"):
        Settings.from_env({"SAIKYO_BATCH_BUCKETS": "0,4"})


# ---- device and dtype ----
def test_device_and_dtype_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    with pytest.raises(RunnerError, match="unknown device"):
        resolve_device("tpu")
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32 and resolve_dtype("fp16", cpu) == torch.float32
    cuda = torch.device("cuda")
    assert resolve_dtype("auto", cuda) == torch.float16 and resolve_dtype("bf16", cuda) == torch.bfloat16
    with pytest.raises(RunnerError, match="unknown dtype"):
        resolve_dtype("int4", cuda)


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(squeezenet_repository: ModelRepository) -> None:
    with pytest.raises(RunnerError, match="no CUDA device"):
        TorchRunner.load(*runner_inputs("squeezenet1_1", settings_for(squeezenet_repository, device="cuda")))


def test_backend_selection(squeezenet_repository: ModelRepository) -> None:
    runner = load_runner("squeezenet1_1", settings_for(squeezenet_repository, backend="torch", device="auto"))
    assert isinstance(runner, TorchRunner)
    assert runner.meta["backend"] == "torch" and runner.meta["device"] == ("cuda" if CUDA else "cpu")
    assert runner.meta["precision"] == ("fp16" if CUDA else "fp32")  # what runs (the file is fp32)
    assert runner.capabilities.device_decode is CUDA
    settings = settings_for(squeezenet_repository, backend="auto")
    auto = load_runner("squeezenet1_1", settings)
    # Without CUDA, auto picks a CPU engine by the rule tests/test_openvino.py checks.
    assert auto.meta["backend"] == ("torch" if CUDA else auto_backend("squeezenet1_1", settings)[0])


# ---- agreement with ONNX Runtime, padding, chunking ----
@pytest.mark.parametrize("n", [1, 3, 4, 9])  # 9 > the top bucket (4): runs as 4 + 4 + 1
def test_pixels_match_onnx_runtime(squeezenet_pair: tuple[TorchRunner, OnnxRunner], n: int) -> None:
    torch_runner, ort_runner = squeezenet_pair
    x = random_pixels(n, seed=n)
    assert_same_network(torch_runner.infer_pixels(x), ort_runner.infer_pixels(x))


def test_tensor_input_matches_onnx_runtime(squeezenet_pair: tuple[TorchRunner, OnnxRunner]) -> None:
    torch_runner, ort_runner = squeezenet_pair
    x = imaging.normalize(random_pixels(5, seed=7), torch_runner.preprocessing)
    got = torch_runner.infer_tensor(x)
    assert_same_network(got, ort_runner.infer_tensor(x))
    # The in-graph normalisation of uint8 pixels is the same as normalising on the host.
    assert_same_network(got, torch_runner.infer_pixels(random_pixels(5, seed=7)))


def test_padding_to_a_bucket_leaves_each_row_unchanged(squeezenet_repository: ModelRepository) -> None:
    spec = zoo.get("squeezenet1_1")
    meta = squeezenet_repository.get("squeezenet1_1").meta
    from saikyo.runtime.torch.runner import build_model

    model = build_model(spec, meta, squeezenet_repository.model_dir("squeezenet1_1") / WEIGHTS_FILE)
    padded = TorchRunner("sq", model, spec.preprocessing, meta, device="cpu", max_batch_size=8, pad=True)
    assert padded.buckets == (1, 2, 4, 8) and padded.meta["batch_buckets"] == [1, 2, 4, 8]
    x = random_pixels(3, seed=3)
    together = padded.infer_pixels(x)  # runs at 4, one padding row
    alone = np.concatenate([padded.infer_pixels(x[i : i + 1]) for i in range(3)])
    assert together.shape == (3, 1000)
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-7)
    assert padded.infer_pixels(x[:0]).shape == (0, 1000)
    # The static-buffer path (the one CUDA takes) for decoded images and tensors, and above the top bucket.
    items = padded.decode_images([p.read_bytes() for p in PHOTOS])
    pixels = np.stack([item.numpy() for item in items])  # type: ignore[union-attr]
    np.testing.assert_allclose(padded.infer_images(items), padded.infer_pixels(pixels), rtol=1e-4, atol=1e-7)
    many = random_pixels(11, seed=11)
    np.testing.assert_allclose(
        padded.infer_tensor(imaging.normalize(many, padded.preprocessing)), padded.infer_pixels(many), rtol=1e-3, atol=1e-6
    )
    resident = padded._slots[0].pixels_dev[:3].numpy().copy()  # what the first slot's input holds now
    np.testing.assert_allclose(padded.forward_resident(3).numpy(), padded.infer_pixels(resident), rtol=1e-4, atol=1e-7)


def padded_runner(repo: ModelRepository, **kw: object) -> TorchRunner:
    from saikyo.runtime.torch.runner import build_model

    spec = zoo.get("squeezenet1_1")
    meta = repo.get("squeezenet1_1").meta
    model = build_model(spec, meta, repo.model_dir("squeezenet1_1") / WEIGHTS_FILE)
    return TorchRunner("sq", model, spec.preprocessing, meta, device="cpu", max_batch_size=4, pad=True, **kw)  # type: ignore[arg-type]


def test_batches_in_flight_from_several_threads_each_get_their_own_rows(
    squeezenet_repository: ModelRepository,
) -> None:
    # The pipelined path CUDA takes (slots, launch and completion threads), on the CPU: as the batcher
    # calls it, from max_in_flight executor threads at once.
    runner = padded_runner(squeezenet_repository, in_flight=3)
    try:
        assert runner.in_flight == 3 and runner.capabilities.max_in_flight == 3 and len(runner._slots) == 3
        batches = [random_pixels(1 + i % 4, seed=100 + i) for i in range(12)]
        alone = [runner.infer_pixels(b) for b in batches]
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(runner.infer_pixels, batches))
            tensors = list(pool.map(runner.infer_tensor, [imaging.normalize(b, runner.preprocessing) for b in batches]))
        for want, got, tensor in zip(alone, together, tensors):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
            np.testing.assert_allclose(tensor, want, rtol=1e-3, atol=1e-6)
        stats = runner.stats
        assert stats is not None
        assert (stats.batches, stats.images, stats.failed, stats.in_flight) == (36, 3 * sum(map(len, batches)), 0, 0)
        assert stats.host_seconds > 0 and stats.device_seconds == 0  # no device clock on the CPU
        # A batch that cannot run (wrong pixel shape) fails alone; its slot serves the next one.
        with pytest.raises(RuntimeError):
            runner.infer_pixels(random_pixels(2, size=100))
        np.testing.assert_allclose(runner.infer_pixels(batches[0]), alone[0], rtol=1e-5, atol=1e-8)
        assert runner.stats.failed == 1  # type: ignore[union-attr]
    finally:
        runner.close()
    with pytest.raises(RuntimeError, match="closed"):
        runner.infer_pixels(batches[0])


def test_metrics_show_device_and_host_time_of_a_pipelined_runner(squeezenet_repository: ModelRepository) -> None:
    from types import SimpleNamespace

    from prometheus_client.parser import text_string_to_metric_families

    from saikyo.server.metrics import Metrics
    from saikyo.server.served import ModelState

    runner = padded_runner(squeezenet_repository, in_flight=2)
    try:
        for n in (1, 4, 3):
            runner.infer_pixels(random_pixels(n))
        metrics = Metrics()
        model = SimpleNamespace(image_batcher=None, tensor_batcher=None, state=ModelState.READY, runner=runner)
        metrics.served = SimpleNamespace(models={"sq": model})  # type: ignore[assignment]
        samples = {
            s.name: s.value
            for family in text_string_to_metric_families(metrics.exposition().decode())
            for s in family.samples
            if s.name.startswith("saikyo_runner_") and s.labels == {"model": "sq"}
        }
        assert samples["saikyo_runner_batches_total"] == 3
        assert samples["saikyo_runner_in_flight_batches"] == 0
        assert samples["saikyo_runner_host_seconds_total"] > 0
        assert samples["saikyo_runner_device_seconds_total"] == 0  # no device clock on the CPU
    finally:
        runner.close()


def test_eager_cpu_runs_directly_one_batch_at_a_time(squeezenet_pair: tuple[TorchRunner, OnnxRunner]) -> None:
    runner, _ = squeezenet_pair
    assert not runner.pad and runner.in_flight == 1 and runner.stats is None
    assert runner.capabilities.max_in_flight == 1


def test_in_flight_setting(squeezenet_repository: ModelRepository) -> None:
    assert Settings.from_env({"SAIKYO_TORCH_IN_FLIGHT": "3"}).torch_in_flight == 3
    with pytest.raises(ValueError, match="torch_in_flight"):
        Settings(torch_in_flight=0)
    with pytest.raises(RunnerError, match="in_flight"):
        padded_runner(squeezenet_repository, in_flight=0)


def test_runner_reads_weights_pt_not_the_seed(squeezenet_repository: ModelRepository, tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    shutil.copytree(squeezenet_repository.model_dir("squeezenet1_1"), repo.model_dir("squeezenet1_1"))
    path = repo.model_dir("squeezenet1_1") / WEIGHTS_FILE
    sd = torch.load(path, weights_only=True)
    bias = next(k for k in sd if k.endswith("bias") and sd[k].shape == (1000,))
    sd[bias][7] += 50.0  # class 7 now wins for every input
    torch.save(sd, path)
    runner = TorchRunner.load(*runner_inputs("squeezenet1_1", settings_for(repo, device="cpu")))
    assert (runner.infer_pixels(random_pixels(2)).argmax(axis=1) == 7).all()


def test_entries_without_weights_pt(squeezenet_repository: ModelRepository, tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    shutil.copytree(squeezenet_repository.model_dir("squeezenet1_1"), repo.model_dir("squeezenet1_1"))
    (repo.model_dir("squeezenet1_1") / WEIGHTS_FILE).unlink()
    s = settings_for(repo, device="cpu")
    # Random weights come back from the seed: the same network as the ONNX file.
    x = random_pixels(2)
    assert_same_network(TorchRunner.load(*runner_inputs("squeezenet1_1", s)).infer_pixels(x), OnnxRunner.load(*runner_inputs("squeezenet1_1", s)).infer_pixels(x))
    meta_path = repo.model_dir("squeezenet1_1") / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "weights": "file:abc"}))
    with pytest.raises(RunnerError, match="no weights.pt"):
        TorchRunner.load(*runner_inputs("squeezenet1_1", s))


def test_quantised_variants_are_refused(squeezenet_repository: ModelRepository, tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    shutil.copytree(squeezenet_repository.model_dir("squeezenet1_1"), repo.model_dir("squeezenet1_1-int8"))
    with pytest.raises(RunnerError, match="onnxruntime"):
        TorchRunner.load(*runner_inputs("squeezenet1_1-int8", settings_for(repo, device="cpu")))


def test_pretrained_efficientnet_knows_the_cat_and_agrees_with_onnx_runtime(pretrained_repository: ModelRepository) -> None:
    s = Settings(repository=pretrained_repository.root, device="cpu")
    torch_runner = TorchRunner.load(*runner_inputs("efficientnet_lite0", s))
    ort_runner = OnnxRunner.load(*runner_inputs("efficientnet_lite0", s))
    pixels = np.stack([imaging.decode(p.read_bytes(), torch_runner.preprocessing) for p in PHOTOS])
    got, want = torch_runner.infer_pixels(pixels), ort_runner.infer_pixels(pixels)
    assert int(got[0].argmax()) in CAT_CLASSES
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()


# ---- device decode, run on the CPU ----
@pytest.mark.parametrize("name", ["resnet50", "efficientnet_lite0", "caffenet"])  # bilinear, bicubic, 227
def test_device_decode_matches_pillow_pixels(name: str) -> None:
    pp = zoo.get(name).preprocessing
    big = encode(Image.open(DATA / "coffee.jpg").resize((1800, 1200)), "JPEG", quality=90)
    blobs = [p.read_bytes() for p in PHOTOS] + [big]
    decoded = torch_imaging.decode(blobs, pp, "cpu")
    for i, (blob, got) in enumerate(zip(blobs, decoded)):
        assert isinstance(got, torch.Tensor) and got.dtype == torch.uint8
        assert tuple(got.shape) == (pp.input_size, pp.input_size, 3)
        diff = np.abs(got.numpy().astype(np.int16) - imaging.decode(blob, pp).astype(np.int16))
        # Same geometry and filter weights as Pillow: only the decoders' rounding differs -- except for
        # the large photo, which Pillow decodes at half size (DCT scaling).
        limit = 1.0 if blob is big else 0.2
        assert diff.mean() < limit, (i, diff.mean())
        assert np.percentile(diff, 99) <= (6 if blob is big else 2)


def test_device_decode_sends_other_formats_and_bad_files_to_the_cpu_path() -> None:
    pp = zoo.get("resnet50").preprocessing
    cat = CAT.read_bytes()
    img = Image.open(CAT)
    png = encode(img, "PNG")
    grey = encode(img.convert("L"), "JPEG")
    cmyk = encode(img.convert("CMYK"), "JPEG")
    blobs = [cat, png, cat[:2000], b"not an image", grey, cmyk, b""]
    assert [torch_imaging.device_decodable(b) for b in blobs] == [True, False, False, False, False, False, False]
    assert not torch_imaging.device_decodable(cat, max_pixels=100)
    assert torch_imaging.jpeg_frame(cat) == (451, 300, 3, False)
    assert torch_imaging.jpeg_frame(cmyk)[2] == 4 and torch_imaging.jpeg_frame(grey)[2] == 1  # type: ignore[index]
    progressive = encode(img, "JPEG", progressive=True, quality=90)
    assert torch_imaging.device_decodable(progressive)
    got = torch_imaging.decode([progressive], pp, "cpu")[0]
    assert np.abs(got.numpy().astype(np.int16) - imaging.decode(progressive, pp)).mean() < 0.5  # type: ignore[union-attr]
    out = torch_imaging.decode(blobs, pp, "cpu")
    np.testing.assert_array_equal(out[1].numpy(), imaging.decode(png, pp))  # PNG: Pillow's own pixels
    np.testing.assert_array_equal(out[4].numpy(), imaging.decode(grey, pp))
    np.testing.assert_array_equal(out[5].numpy(), imaging.decode(cmyk, pp))
    assert isinstance(out[2], imaging.ImageError) and "truncated" in str(out[2])
    assert isinstance(out[3], imaging.ImageError) and "not a recognised image" in str(out[3])
    assert isinstance(out[6], imaging.ImageError) and "empty" in str(out[6])
    too_big = torch_imaging.decode([cat], pp, "cpu", max_pixels=1000)[0]
    assert isinstance(too_big, imaging.ImageError) and "limit" in str(too_big)


def test_a_corrupt_jpeg_in_a_batch_costs_only_itself() -> None:
    pp = zoo.get("resnet50").preprocessing
    cat = CAT.read_bytes()
    # Header and end marker intact, entropy-coded data replaced: passes the header check, fails decoding.
    broken = cat[:700] + bytes(range(256)) * 4 + b"\xff\xd9"
    assert torch_imaging.device_decodable(broken)
    out = torch_imaging.decode([cat, broken, cat], pp, "cpu")
    alone = torch_imaging.decode([cat], pp, "cpu")[0]
    assert isinstance(out[1], (torch.Tensor, imaging.ImageError))
    for good in (out[0], out[2]):
        assert isinstance(good, torch.Tensor)
        np.testing.assert_array_equal(good.numpy(), alone.numpy())  # type: ignore[union-attr]


def test_infer_images_matches_infer_pixels(squeezenet_repository: ModelRepository) -> None:
    runner = TorchRunner.load(*runner_inputs("squeezenet1_1", settings_for(squeezenet_repository, device="cpu", device_decode="on")))
    assert runner.capabilities.device_decode
    blobs = [p.read_bytes() for p in PHOTOS]
    items = runner.decode_images(blobs)
    pixels = np.stack([item.numpy() for item in items])  # type: ignore[union-attr]
    np.testing.assert_allclose(runner.infer_images(items), runner.infer_pixels(pixels), rtol=1e-5, atol=1e-8)
    # CPU-decoded numpy items (the fallback) may be mixed in.
    mixed = [items[0], pixels[1], items[2]]
    np.testing.assert_allclose(runner.infer_images(mixed), runner.infer_pixels(pixels), rtol=1e-5, atol=1e-8)


def test_batcher_passes_opaque_items_as_a_list() -> None:
    seen: list[list[object]] = []

    def infer(batch: list[object]) -> np.ndarray:
        assert isinstance(batch, list)
        seen.append(list(batch))
        return np.asarray([[float(str(x)[1:])] for x in batch], np.float32)

    async def main() -> None:
        batcher = DynamicBatcher(infer, None, None, ThreadPoolExecutor(1), max_batch_size=3, max_queue_images=16)
        batcher.start()
        a, b = await asyncio.gather(batcher.submit(["x1", "x2"]), batcher.submit(["x3", "x4", "x5"]))
        await batcher.close()
        assert a[:, 0].tolist() == [1.0, 2.0] and b[:, 0].tolist() == [3.0, 4.0, 5.0]

    asyncio.run(main())
    assert all(len(batch) <= 3 for batch in seen) and sum(map(len, seen)) == 5


# ---- the server, torch backend, decode through the device path ----
def test_server_with_the_torch_backend(pretrained_repository: ModelRepository, tmp_path: Path) -> None:
    png = encode(Image.open(CAT), "PNG")
    with running_server(
        pretrained_repository.root, "efficientnet_lite0", tmp_path, "--backend", "torch", "--device", "cpu",
        "--device-decode", "on", "--max-batch-size", "4",
    ) as server:  # fmt: skip
        meta = httpx.get(f"{server.url}/v2/models/efficientnet_lite0", timeout=10).json()
        assert meta["parameters"]["backend"] == "torch" and meta["parameters"]["device"] == "cpu"
        assert meta["parameters"]["precision"] == "fp32"  # what records take: torch on the CPU stays fp32
        files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in PHOTOS]
        files.insert(1, ("images", ("cat.png", png, "image/png")))
        r = httpx.post(f"{server.url}/classify", files=files, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body) == 4
        for i in (0, 1):  # the JPEG (device path) and the PNG (CPU path) are both the cat
            assert int(next(iter(body[i]))) in CAT_CLASSES
        assert list(body[0]) == list(body[1])
        bad = httpx.post(
            f"{server.url}/classify", files=[("images", ("cut.jpg", CAT.read_bytes()[:2000], "image/jpeg"))], timeout=30
        )
        assert bad.status_code == 400 and "cut.jpg" in bad.json()["error"]
        again = httpx.post(f"{server.url}/classify", files=files[:1], timeout=60)
        assert again.status_code == 200 and again.json()[0] == pytest.approx(body[0], rel=1e-4, abs=1e-6)


# ---- CUDA ----
# Random squeezenet, not the pretrained model: GPU machines may lack the efficientnet weights package.
@pytest.mark.gpu
@needs_cuda
def test_cuda_runner_captures_graphs_and_agrees_with_fp32_cpu(squeezenet_repository: ModelRepository) -> None:
    gpu = TorchRunner.load(*runner_inputs("squeezenet1_1", settings_for(squeezenet_repository, device="cuda", max_batch_size=8)))
    cpu = TorchRunner.load(*runner_inputs("squeezenet1_1", settings_for(squeezenet_repository, device="cpu")))
    assert gpu.meta["dtype"] == "float16" and gpu.meta["precision"] == "fp16"
    assert gpu.cuda_graphs and gpu.buckets == (1, 2, 4, 8)
    assert gpu.in_flight == 2 and gpu.capabilities.max_in_flight == 2 and gpu.meta["in_flight"] == 2
    for slot in gpu._slots:  # every slot has a graph of each bucket, reading its own input
        assert {size for kind, size in slot.graphs if kind == "pixels"} == {1, 2, 4, 8}
    assert gpu.capabilities.device_decode and not cpu.capabilities.device_decode

    def close(got: np.ndarray, want: np.ndarray) -> None:  # fp16 against fp32
        lg, lw = np.log(got.astype(np.float64)), np.log(want.astype(np.float64))
        lg -= lg.mean(axis=1, keepdims=True)
        lw -= lw.mean(axis=1, keepdims=True)
        assert float(np.abs(lg - lw).max()) <= 2e-2 * float(np.ptp(lw, axis=1).max()) + 1e-3

    pixels = random_pixels(19, seed=5)
    for n in (1, 3, 8, 19):  # 19: chunks of 8, 8, 3 (padded to 4)
        close(gpu.infer_pixels(pixels[:n]), cpu.infer_pixels(pixels[:n]))
    x = imaging.normalize(pixels[:5], gpu.preprocessing)
    close(gpu.infer_tensor(x), cpu.infer_tensor(x))
    photos = [p.read_bytes() for p in PHOTOS]
    items = gpu.decode_images(photos)
    assert all(isinstance(t, torch.Tensor) and t.is_cuda for t in items)
    on_cpu = np.stack([imaging.decode(b, gpu.preprocessing) for b in photos])
    close(gpu.infer_images(items), cpu.infer_pixels(on_cpu))
    stats = gpu.stats
    assert stats is not None and stats.batches >= 8 and stats.in_flight == 0
    assert 0 < stats.device_seconds and 0 < stats.host_seconds  # CUDA events and host clocks both counted


@pytest.mark.gpu
@needs_cuda
def test_nvjpeg_decode_matches_pillow_pixels() -> None:
    pp = zoo.get("resnet50").preprocessing
    blobs = [p.read_bytes() for p in PHOTOS]
    blobs.append(encode(Image.open(CAT), "PNG"))  # not for nvJPEG: decoded on the CPU, then moved
    for blob, got in zip(blobs, torch_imaging.decode(blobs, pp, "cuda")):
        assert isinstance(got, torch.Tensor) and got.is_cuda
        diff = np.abs(got.cpu().numpy().astype(np.int16) - imaging.decode(blob, pp).astype(np.int16))
        assert diff.mean() < 1.0


@pytest.mark.gpu
@needs_cuda
def test_server_on_cuda_decodes_on_the_gpu(squeezenet_repository: ModelRepository, tmp_path: Path) -> None:
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in PHOTOS]
    files.append(("images", ("cat.png", encode(Image.open(CAT), "PNG"), "image/png")))
    answers = {}
    for decode in ("on", "off"):
        with running_server(
            squeezenet_repository.root, "squeezenet1_1", tmp_path, "--backend", "torch", "--device", "cuda",
            "--device-decode", decode, "--max-batch-size", "8",
        ) as server:  # fmt: skip
            meta = httpx.get(f"{server.url}/v2/models/squeezenet1_1", timeout=10).json()
            assert meta["parameters"]["device"].startswith("cuda")
            assert meta["parameters"]["precision"] == "fp16"  # the CUDA default, as records name it
            r = httpx.post(f"{server.url}/classify", files=files, params={"topk": 1000}, timeout=60)
            assert r.status_code == 200, r.text
            answers[decode] = [[row[str(k)] for k in range(1000)] for row in r.json()]
            bad = httpx.post(f"{server.url}/classify", files=[("images", ("cut.jpg", CAT.read_bytes()[:2000]))], timeout=30)
            assert bad.status_code == 400
            text = httpx.get(f"{server.url}/metrics", timeout=10).text
            device_s = re.search(r'^saikyo_runner_device_seconds_total\{model="squeezenet1_1"\} (\S+)$', text, re.M)
            assert device_s and float(device_s.group(1)) > 0, text
    np.testing.assert_allclose(np.asarray(answers["on"]), np.asarray(answers["off"]), rtol=0.05, atol=1e-5)
