"""What every peer app shares: the model's own preprocessing, an engine, the top-5 answer, the command line.

A peer is the server a skilled user builds on a framework in an afternoon: the repository entry's
model.onnx (the file saikyo serves), its meta.json preprocessing done in PIL and numpy, one engine with its
own defaults (OpenVINO: its default precision, bf16 on CPUs that have it), and the framework's batching on
where it has any. Kept in one place so that every peer runs exactly the same per-image work.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

Forward = Callable[[np.ndarray], np.ndarray]


def arguments(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("model_dir", type=Path, help="a repository entry: model.onnx and meta.json")
    ap.add_argument("--engine", choices=("onnxruntime", "openvino"), default="onnxruntime")
    ap.add_argument("--port", type=int, default=8090)
    ap.add_argument("--name", help="the model's name in URLs [default: the entry's directory name]")
    return ap.parse_args()


def preprocessing(model_dir: Path) -> dict:
    return json.loads((model_dir / "meta.json").read_text())["preprocessing"]


def engine(model_dir: Path, name: str) -> Forward:
    """A forward pass (NCHW float32 in, logits out) on ONNX Runtime or OpenVINO, each with its defaults."""
    model_file = str(model_dir / "model.onnx")
    if name == "onnxruntime":
        import onnxruntime as ort

        session = ort.InferenceSession(model_file, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        return lambda x: session.run(None, {input_name: x})[0]
    sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # nothing leaves this machine
    import openvino as ov

    compiled = ov.Core().compile_model(model_file, "CPU")
    lock = threading.Lock()  # compiled(x) reuses one infer request: "Infer Request is busy" without it

    def forward(x: np.ndarray) -> np.ndarray:
        with lock:
            return compiled(x)[0]

    return forward


def preprocess(image: Image.Image | bytes, pp: dict) -> np.ndarray:
    """Shorter side to resize_size, centre crop input_size, scale and normalise: CHW float32."""
    img = Image.open(io.BytesIO(image)) if isinstance(image, bytes) else image
    img = img.convert("RGB")
    scale = pp["resize_size"] / min(img.size)
    resample = Image.Resampling.BICUBIC if pp["interpolation"] == "bicubic" else Image.Resampling.BILINEAR
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample)
    left, top = (img.width - pp["input_size"]) // 2, (img.height - pp["input_size"]) // 2
    img = img.crop((left, top, left + pp["input_size"], top + pp["input_size"]))
    x = (np.asarray(img, np.float32) / 255 - pp["mean"]) / pp["std"]
    return x.transpose(2, 0, 1).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return probs / probs.sum(1, keepdims=True)


def top5(logits: np.ndarray) -> list[dict[str, float]]:
    """The 2018 answer: per image, the five most likely class indices (strings) with their probabilities."""
    return [{str(i): float(p[i]) for i in np.argsort(-p)[:5]} for p in softmax(logits)]
