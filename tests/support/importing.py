"""What the import tests share: running the real command, asking the real server, comparing with the
source framework's answer on the same pixels."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
from support.serverproc import ServerProcess

from saikyo.inference import imaging
from saikyo.inference.predictions import softmax
from saikyo.inference.preprocessing import Preprocessing
from saikyo.models.repository import ModelRepository

# Eight photos the models have never seen, as JPEG uploads: one request of 1, one of 8.
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "camera", "immunohistochemistry", "hubble_deep_field", "retina")
# Served probabilities vs the source framework's on the same pixels: float32 rounding (fused ops, another
# batch size) moves them by ~1e-6; a wrong channel order, scale or layout moves them by > 1e-2.
TOLERANCE = 1e-4


def saikyo(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real command, without this environment's SAIKYO_* settings."""
    clean = {k: v for k, v in (env or os.environ).items() if not k.startswith("SAIKYO_")}
    clean["COLUMNS"] = "400"  # one line per message, for matching
    return subprocess.run([sys.executable, "-m", "saikyo", *map(str, args)], capture_output=True, text=True, env=clean, timeout=600)


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
