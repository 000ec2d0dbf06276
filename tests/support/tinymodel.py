"""Small generated ONNX classifiers: real graphs, milliseconds per batch, for tests where speed matters."""

from __future__ import annotations

import datetime as _dt
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from saikyo.models.repository import Entry, ModelRepository
from saikyo.inference.preprocessing import Preprocessing


def tiny_classifier(input_size: int = 32, classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """conv 3x3 (8 channels) -> relu -> global average pool -> dense: input [N,3,S,S] -> logits [N,classes]."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    fc = rng.standard_normal((8, classes)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, input_size, input_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(fc, "fc")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def add_model(
    repository: ModelRepository,
    name: str,
    model: onnx.ModelProto | bytes,
    input_size: int = 32,
    family: str = "Test",
    precision: str = "fp32",
) -> Entry:
    """Write a generated model (or raw bytes, for a deliberately broken file) into the repository."""
    repository.root.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(suffix=".onnx", delete=False, dir=repository.root) as f:
        path = Path(f.name)
    if isinstance(model, bytes):
        path.write_bytes(model)
    else:
        onnx.save(model, str(path))
    meta = {
        "name": name,
        "family": family,
        "base_model": name,
        "weights": "random",
        "input_size": input_size,
        "preprocessing": Preprocessing(input_size=input_size, crop_pct=0.875).to_dict(),
        "opset": 17,
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "num_classes": 1000,
        "precision": precision,
    }
    return repository.write(name, path, meta)


def add_tiny_model(repository: ModelRepository, name: str = "tiny", input_size: int = 32, seed: int = 0) -> Entry:
    return add_model(repository, name, tiny_classifier(input_size, seed=seed), input_size, family="Tiny")


def add_tiny_models(repository: ModelRepository) -> ModelRepository:
    """The suite's tiny repository: `tiny` (32 px, seed 0) and `tiny2` (48 px, seed 1)."""
    repository.root.mkdir(parents=True, exist_ok=True)
    add_tiny_model(repository, "tiny", input_size=32, seed=0)
    add_tiny_model(repository, "tiny2", input_size=48, seed=1)
    return repository


def copy_repository(repository: ModelRepository, destination: Path) -> ModelRepository:
    """A copy of a shared (session) repository for a test that adds to it."""
    shutil.copytree(repository.root, destination)
    return ModelRepository(destination)


def add_tiny_int8_model(repository: ModelRepository, name: str = "tiny-int8", input_size: int = 32, seed: int = 0) -> Entry:
    """The tiny classifier statically quantised the way models/quantize.py does it (QDQ, int8 weights per
    channel, uint8 activations), calibrated on random normalised inputs: a real NAME-int8 file in seconds."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(seed)
            self.batches = iter([{"input": rng.standard_normal((4, 3, input_size, input_size), np.float32)} for _ in range(4)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(tiny_classifier(input_size, seed=seed), str(fp32))
        quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
        return add_model(repository, name, onnx.load(str(int8)), input_size, family="Tiny", precision="int8")


def heavy_classifier(megabytes: int, input_size: int = 32, seed: int = 0) -> onnx.ModelProto:
    """tiny_classifier with a hidden layer whose weights take about `megabytes`: what an unload must free."""
    rng = np.random.default_rng(seed)
    hidden = megabytes * 1_000_000 // 4 // 1000
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    fc1 = (rng.standard_normal((8, hidden)) / 8).astype(np.float32)
    fc2 = (rng.standard_normal((hidden, 1000)) / np.sqrt(hidden)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["conv"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc1"], ["h"]),
        helper.make_node("MatMul", ["h", "fc2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, input_size, input_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(fc2, "fc2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
