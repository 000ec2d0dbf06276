"""The peer saikyo is compared with: the Flask app a user writes in an afternoon, the 2018 API on one model.

    python benchmarks/peer_flask.py MODEL_DIR --engine onnxruntime|openvino --port 8090

MODEL_DIR is a repository entry (model.onnx, meta.json for its preprocessing). Threaded Flask, one forward
pass per request, each engine with its own defaults (OpenVINO: its default precision, bf16 on CPUs that
have it). benchmarks/backends.py starts it; it is kept as plain as such an app is.
"""

import argparse
import json
import sys
import threading
from pathlib import Path

import numpy as np
from flask import Flask, jsonify, request
from PIL import Image

ap = argparse.ArgumentParser()
ap.add_argument("model_dir", type=Path)
ap.add_argument("--engine", choices=("onnxruntime", "openvino"), default="onnxruntime")
ap.add_argument("--port", type=int, default=8090)
args = ap.parse_args()
pp = json.loads((args.model_dir / "meta.json").read_text())["preprocessing"]
model_file = str(args.model_dir / "model.onnx")

if args.engine == "onnxruntime":
    import onnxruntime as ort

    session = ort.InferenceSession(model_file, providers=["CPUExecutionProvider"])
    forward = lambda x: session.run(None, {session.get_inputs()[0].name: x})[0]  # noqa: E731
else:
    sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # nothing leaves this machine
    import openvino as ov

    compiled = ov.Core().compile_model(model_file, "CPU")
    lock = threading.Lock()  # compiled(x) reuses one infer request: "Infer Request is busy" without it

    def forward(x: np.ndarray) -> np.ndarray:
        with lock:
            return compiled(x)[0]

app = Flask(__name__)


def preprocess(file) -> np.ndarray:
    img = Image.open(file.stream).convert("RGB")
    scale = pp["resize_size"] / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC
                     if pp["interpolation"] == "bicubic" else Image.Resampling.BILINEAR)  # fmt: skip
    left, top = (img.width - pp["input_size"]) // 2, (img.height - pp["input_size"]) // 2
    img = img.crop((left, top, left + pp["input_size"], top + pp["input_size"]))
    x = (np.asarray(img, np.float32) / 255 - pp["mean"]) / pp["std"]
    return x.transpose(2, 0, 1).astype(np.float32)


@app.post("/classify")
def classify():
    logits = forward(np.stack([preprocess(f) for f in request.files.getlist("images")]))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return jsonify([{str(i): float(p[i]) for i in np.argsort(-p)[:5]} for p in probs])


app.run(host="127.0.0.1", port=args.port, threaded=True)
