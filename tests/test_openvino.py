"""The OpenVINO runner: agreement with ONNX Runtime, precisions (auto, bf16, int8), several batches in flight,
the server on it, honest accuracy under bf16 on held-out photos, and that nothing is ever reported home.

Every test here skips cleanly where OpenVINO is not installed (`make test` installs it).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from support.paths import CAT, DATA, ROOT
from support.serverproc import running_server
from support.tinymodel import add_tiny_int8_model, copy_repository

from saikyo.bench.localserver import local_server
from saikyo.inference import imaging
from saikyo.models.quantize import held_out_pixels
from saikyo.models.repository import ModelRepository
from saikyo.runtime import RunnerError, auto_backend, load_runner, openvino_installed
from saikyo.settings import Settings

needs_openvino = pytest.mark.skipif(not openvino_installed(), reason="OpenVINO is not installed")
X86 = platform.machine().lower() in ("x86_64", "amd64")


def native_bf16() -> bool:
    if not openvino_installed():
        return False
    from saikyo.runtime.openvino import cpu_has_native_bf16

    return cpu_has_native_bf16()


needs_bf16 = pytest.mark.skipif(not native_bf16(), reason="this CPU has no native bf16 (or OpenVINO is absent)")


@pytest.fixture(scope="module")
def repo(tiny_repository: ModelRepository, tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    repository = copy_repository(tiny_repository, tmp_path_factory.mktemp("openvino") / "repository")
    add_tiny_int8_model(repository, "tiny-int8", input_size=32, seed=0)
    return repository


def pixels_for(runner, n: int = 6, seed: int = 0) -> np.ndarray:
    size = runner.preprocessing.input_size
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def settings(repo: ModelRepository, **kw) -> Settings:
    return Settings(repository=repo.root, device="cpu", **kw)


@needs_openvino
@pytest.mark.parametrize("name", ["tiny", "tiny2"])
def test_fp32_agrees_with_onnx_runtime_on_pixels_and_tensors(repo: ModelRepository, name: str) -> None:
    ov = load_runner(name, settings(repo, backend="openvino", precision="fp32"))
    ort = load_runner(name, settings(repo, backend="onnxruntime"))
    assert ov.meta["backend"] == "openvino" and ov.meta["precision"] == "fp32" and ov.meta["device"] == "cpu"
    assert ov.num_classes == 1000
    px = pixels_for(ov)
    got, want = ov.infer_pixels(px), ort.infer_pixels(px)
    assert got.shape == (6, 1000) and got.dtype == np.float32
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)  # PrePostProcessor front = ORT's prepended nodes
    tensor = imaging.normalize(px, ov.preprocessing)
    np.testing.assert_allclose(ov.infer_tensor(tensor), got, rtol=1e-4, atol=1e-7)
    # Batch sizes change from call to call: the compiled model keeps a dynamic batch dimension.
    np.testing.assert_allclose(ov.infer_pixels(px[:1]), got[:1], rtol=1e-4, atol=1e-7)
    ov.close()
    ort.close()


@needs_openvino
def test_precision_auto_is_what_openvino_itself_picks_on_this_cpu(repo: ModelRepository) -> None:
    import openvino as ov

    runner = load_runner("tiny", settings(repo, backend="openvino"))
    expected = "bf16" if native_bf16() else "fp32"
    assert runner.meta["precision"] == expected and runner.meta["inference_precision"] == expected
    if X86:  # OpenVINO's own default on x86: bf16 where the CPU has it, f32 elsewhere (ARM defaults to f16)
        default = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
        assert {"bf16": "bf16", "f32": "fp32"}[default] == expected


@needs_bf16
def test_bf16_runs_bf16_and_stays_close_to_fp32(repo: ModelRepository) -> None:
    bf16 = load_runner("tiny2", settings(repo, backend="openvino", precision="bf16"))
    fp32 = load_runner("tiny2", settings(repo, backend="openvino", precision="fp32"))
    assert bf16.meta["precision"] == "bf16"
    px = pixels_for(bf16)
    got, want = bf16.infer_pixels(px), fp32.infer_pixels(px)
    assert not np.array_equal(got, want)  # it really ran another precision
    assert float(np.abs(got - want).max()) < 0.05


@needs_openvino
@pytest.mark.skipif(native_bf16(), reason="this CPU has native bf16: nothing to refuse")
def test_bf16_is_refused_where_the_cpu_lacks_it(repo: ModelRepository) -> None:
    with pytest.raises(RunnerError, match="no native bf16"):
        load_runner("tiny", settings(repo, backend="openvino", precision="bf16"))


def test_onnx_runtime_refuses_bf16_and_says_where_it_runs(repo: ModelRepository) -> None:
    with pytest.raises(RunnerError, match="bf16 needs --backend openvino"):
        load_runner("tiny", settings(repo, backend="onnxruntime", precision="bf16"))


@needs_openvino
def test_the_int8_file_runs_as_int8_and_agrees_with_onnx_runtimes_int8(repo: ModelRepository) -> None:
    ov = load_runner("tiny-int8", settings(repo, backend="openvino"))
    ort = load_runner("tiny-int8", settings(repo, backend="onnxruntime"))
    assert ov.meta["precision"] == "int8" == ort.meta["precision"]
    px = pixels_for(ov, n=16)
    got, want = ov.infer_pixels(px), ort.infer_pixels(px)
    # Two int8 engines round differently; they must still be the same network.
    assert float(np.abs(got - want).max()) < 0.05
    assert float(np.mean(got.argmax(1) == want.argmax(1))) >= 0.8


@needs_openvino
def test_streams_are_batches_in_flight_and_agree_when_run_at_once(repo: ModelRepository) -> None:
    runner = load_runner("tiny", settings(repo, backend="openvino", precision="fp32", openvino_streams=2, intra_op_threads=2))
    assert runner.capabilities.max_in_flight == 2 and runner.meta["streams"] == 2
    batches = [pixels_for(runner, n=4, seed=s) for s in range(8)]
    alone = [runner.infer_pixels(b) for b in batches]
    together: list[np.ndarray | None] = [None] * len(batches)

    def run(i: int) -> None:
        together[i] = runner.infer_pixels(batches[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)
    # Never more streams than threads: they would only queue.
    one_thread = load_runner("tiny", settings(repo, backend="openvino", openvino_streams=4, intra_op_threads=1))
    assert one_thread.capabilities.max_in_flight == 1


@needs_openvino
def test_auto_picks_openvino_below_fp32_and_onnx_runtime_for_fp32() -> None:
    if not X86:
        assert auto_backend("tiny", Settings(device="cpu"))[0] == "onnxruntime"
        return
    assert auto_backend("tiny-int8", Settings(device="cpu"))[0] == "openvino"
    assert auto_backend("tiny", Settings(device="cpu", precision="fp32"))[0] == "onnxruntime"
    assert auto_backend("tiny", Settings(device="cpu", precision="bf16"))[0] == "openvino"
    expected = "openvino" if native_bf16() else "onnxruntime"
    assert auto_backend("tiny", Settings(device="cpu"))[0] == expected


@needs_openvino
def test_server_on_openvino_with_two_batches_in_flight(repo: ModelRepository, tmp_path: Path) -> None:
    args = ("--backend", "openvino", "--precision", "fp32", "--openvino-streams", "2", "--intra-op-threads", "2",
            "--max-batch-size", "2")  # fmt: skip
    with running_server(repo.root, "tiny,tiny-int8", tmp_path, *args) as server:
        meta = httpx.get(f"{server.url}/v2/models/tiny").json()
        assert meta["platform"] == "openvino"
        assert meta["parameters"]["backend"] == "openvino" and meta["parameters"]["precision"] == "fp32"
        int8 = httpx.get(f"{server.url}/v2/models/tiny-int8").json()
        assert int8["parameters"]["precision"] == "int8"
        photos = [CAT, DATA / "coffee.jpg", DATA / "astronaut.jpg"]
        files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos for _ in range(3)]
        with httpx.Client(base_url=server.url, timeout=60) as client:
            answers = [client.post("/classify?model=tiny&topk=1000", files=files) for _ in range(2)]
        # Nine images in batches of two, two batches at a time: every row in request order, as computed here.
        local = load_runner("tiny", settings(repo, backend="openvino", precision="fp32"))
        pp = local.preprocessing
        want = local.infer_pixels(np.stack([imaging.decode(p.read_bytes(), pp) for p in photos for _ in range(3)]))
        for answer in answers:
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert len(body) == 9
            for row, probs in zip(body, want):
                got = np.array([row[str(i)] for i in range(1000)])
                np.testing.assert_allclose(got, probs, rtol=1e-4, atol=1e-7)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'saikyo_images_total{model="tiny"} 18.0' in metrics


@needs_openvino
def test_a_server_without_a_backend_flag_runs_what_auto_picks(repo: ModelRepository, tmp_path: Path) -> None:
    expected, _ = auto_backend("tiny", Settings())
    with local_server(repo.root, "tiny", tmp_path) as server:  # no flags at all: the defaults
        params = httpx.get(f"{server.url}/v2/models/tiny").json()["parameters"]
    assert params["backend"] == expected
    if expected == "openvino":
        assert params["precision"] == ("bf16" if native_bf16() else "fp32")


@needs_openvino
def test_a_server_never_reports_anything_home(repo: ModelRepository, tmp_path: Path) -> None:
    """`import openvino` reports itself through openvino-telemetry unless a consent file says no (an absent
    file counts as yes, outside CI). Our runner hides that package first, so OpenVINO uses its own no-op
    stub: no module, no client id written to the home directory, nothing sent."""
    home = tmp_path / "home"
    home.mkdir()
    code = f"""
import json, os, sys
import numpy as np
from saikyo.runtime import load_runner
from saikyo.settings import Settings
runner = load_runner("tiny", Settings(repository={str(repo.root)!r}, backend="openvino"))
runner.infer_pixels(np.zeros((1, 32, 32, 3), np.uint8))
import openvino.tools.ovc.telemetry_utils as t
print(json.dumps({{"module": repr(sys.modules.get("openvino_telemetry")), "ovc": t.tm.__name__,
                   "home": sorted(os.listdir(os.environ["HOME"]))}}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}  # the default path
    env.update(HOME=str(home), PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"module": "None", "ovc": "openvino.tools.ovc.telemetry_stub", "home": []}


# ---- accuracy on real photos the int8 calibration never saw ----
NEAR_TIE = 0.02  # fp32's top two closer than this: any rounding may order them either way


@needs_bf16
def test_pretrained_top1_survives_bf16_on_every_held_out_photo(pretrained_repository: ModelRepository) -> None:
    ort = load_runner("efficientnet_lite0", Settings(repository=pretrained_repository.root, backend="onnxruntime"))
    bf16 = load_runner("efficientnet_lite0", Settings(repository=pretrained_repository.root, backend="openvino", precision="bf16"))
    names, pixels = held_out_pixels(ort.preprocessing, sorted(DATA.glob("*.jpg")))
    assert len(names) >= 8
    want, got = ort.infer_pixels(pixels), bf16.infer_pixels(pixels)
    for name, p32, p16 in zip(names, want, got):
        first, second = np.argsort(-p32)[:2]
        if p32[first] - p32[second] > NEAR_TIE:
            assert int(p16.argmax()) == int(first), f"{name}: bf16 says {p16.argmax()}, fp32 {first}"
        else:  # a near tie (the cat: tiger cat vs Egyptian cat) may swap, and only with its runner-up
            assert int(p16.argmax()) in (int(first), int(second)), f"{name}: bf16 says {p16.argmax()}"
    assert float(np.abs(got - want).max()) < 0.05
